#!/usr/bin/env bash
# The serving benchmark of docs/benchmarks.md: tokenmill (the GGUF as stored and dequantized, and
# token budgets) and llama.cpp's own llama-server with --parallel slots (continuous batching; built by
# benchmarks/build_llama_cpp.sh) on the same GGUF file and the same load, one after another.
# llama-cpp-python's server runs one sequence at a time and is not the fair anchor.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-docs/serving.json}
MODEL=$($PY -m tokenmill.cli fetch)
LOAD="--num-prompts 16 --input-len 128 --output-len 32 --model smol"
[ "${ONLY:-}" = llama.cpp ] || rm -f "$OUT"

wait_up() { for _ in $(seq 120); do curl -sf "http://127.0.0.1:$1/v1/models" >/dev/null && return 0; sleep 1; done; return 1; }

run_tokenmill() {  # $1 = max-num-batched-tokens, $2 = rates, $3 = concurrency, $4 = dtype, $5 = extra flags
  .venv/bin/tokenmill serve --model "$MODEL" --port 8803 --served-model-name smol --max-num-batched-tokens "$1" \
      --dtype "$4" ${5:-} --log-level warning & pid=$!
  wait_up 8803
  $PY benchmarks/serving.py run --base-url http://127.0.0.1:8803 --label "tokenmill $4 ${5:-as stored} mnbt=$1" $LOAD \
      --request-rates "$2" --concurrency "$3" --out "$OUT"
  kill -TERM $pid; wait $pid || true
}

if [ "${ONLY:-}" != llama.cpp ]; then
  run_tokenmill 2048 1,4,inf 1,8 float32
  run_tokenmill 2048 1,4,inf 1,8 float32 "--quantization dequantize"
  if [ -z "${QUICK:-}" ]; then
    run_tokenmill 512 4,inf "" float32
    run_tokenmill 128 4,inf "" float32
    run_tokenmill 2048 1,4,inf 1,8 bfloat16 "--quantization dequantize"    # the fast dtype on AMX-BF16 CPUs
  fi
fi

LLAMA_BIN=$(bash benchmarks/build_llama_cpp.sh)
PARALLEL=${PARALLEL:-16}
"$LLAMA_BIN/llama-server" -m "$MODEL" --host 127.0.0.1 --port 8802 -c $((PARALLEL * 1024)) -t 2 \
    --parallel "$PARALLEL" --alias smol --log-disable & pid=$!
wait_up 8802
$PY benchmarks/serving.py run --base-url http://127.0.0.1:8802 --label "llama-server --parallel $PARALLEL" $LOAD \
    --request-rates 1,4,inf --concurrency 1,8 --out "$OUT"
kill -TERM $pid; wait $pid || true

$PY benchmarks/serving.py report "$OUT" --png "${PNG:-docs/serving.png}"
