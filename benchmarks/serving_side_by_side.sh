#!/usr/bin/env bash
# The serving benchmark of docs/benchmarks.md: tokenmill (three token budgets) and llama.cpp's
# OpenAI server on the same GGUF file and the same load, one after another on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-docs/serving.json}
MODEL=$($PY -m tokenmill.cli fetch)
LOAD="--num-prompts 16 --input-len 128 --output-len 32 --model smol"
[ "${ONLY:-}" = llama.cpp ] || rm -f "$OUT"

wait_up() { for _ in $(seq 120); do curl -sf "http://127.0.0.1:$1/v1/models" >/dev/null && return 0; sleep 1; done; return 1; }

run_tokenmill() {  # $1 = max-num-batched-tokens, $2 = rates, $3 = concurrency, $4 = dtype
  .venv/bin/tokenmill serve --model "$MODEL" --port 8803 --served-model-name smol --max-num-batched-tokens "$1" \
      --dtype "$4" --log-level warning & pid=$!
  wait_up 8803
  $PY benchmarks/serving.py run --base-url http://127.0.0.1:8803 --label "tokenmill $4 mnbt=$1" $LOAD \
      --request-rates "$2" --concurrency "$3" --out "$OUT"
  kill -TERM $pid; wait $pid || true
}

if [ "${ONLY:-}" != llama.cpp ]; then
  run_tokenmill 2048 1,4,inf 1,8 float32
  run_tokenmill 512 4,inf "" float32
  run_tokenmill 128 4,inf "" float32
  run_tokenmill 2048 1,4,inf 1,8 bfloat16     # the fast dtype on CPUs with AMX-BF16
fi

$PY -m llama_cpp.server --model "$MODEL" --host 127.0.0.1 --port 8802 --n_ctx 4096 --n_threads 2 \
    --model_alias smol --interrupt_requests False & pid=$!   # default: a new request cancels the running one
wait_up 8802
$PY benchmarks/serving.py run --base-url http://127.0.0.1:8802 --label llama.cpp $LOAD \
    --request-rates 1,4,inf --concurrency 1,8 --out "$OUT"
kill -TERM $pid; wait $pid || true

$PY benchmarks/serving.py report "$OUT" --png docs/serving.png
