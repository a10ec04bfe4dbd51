#!/usr/bin/env bash
# Every GPU check in one call, each part under its own time limit (about 4 minutes on an H200: 1 for the
# kernels, 2-3 for the engine; at most 10), tables
# into $OUT (the device tool's folder) or ./gpu-results:
#
#   PYTHONPATH=. bash benchmarks/gpu_checks.sh [MODEL.gguf]
#
# 1. the Triton int4/int8 products against dense bfloat16, both routes timed (gpu_quant.py);
# 2. the Triton attention kernels against the reference, prefill TFLOP/s against FlashAttention-2, decode
#    bandwidth (attention_gpu.py --quick);
# 3. the engine on the device against transformers on the device: tiny random models of each architecture,
#    then, given the GGUF, agreement, perplexity and speed on it (gpu_engine.py).
# The test suite is not among them: it is the CPU suite and hides the GPU (tests/conftest.py).
# A device machine fetches nothing, and a call carries at most 64 MiB. What the first run did (docs/benchmarks.md):
#   here: `split -b 52000000 -d MODEL.gguf` into .gpu/a and .gpu/b (listed in .git/info/exclude), and the wheels
#   the image lacks into .whl (gguf, plus fastapi/starlette/pydantic/pydantic_core/uvicorn for the server;
#   `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`);
#   call 1 (carry .gpu/a): copy the half to /tmp, run the kernel checks;
#   call 2 at once, while the machine is warm (carry .gpu/b and .whl): `pip install --no-deps --target /tmp/site
#   .whl/*.whl`, PYTHONPATH=.:/tmp/site, join the halves, check the sha256, run this script with the file.
set -uo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
timeout 120 python3 benchmarks/gpu_quant.py 2>&1 | tee "$out/gpu_quant.md"
timeout 180 python3 benchmarks/attention_gpu.py --quick 2>&1 | tee "$out/attention_gpu.md"
model=()
if [ -n "${1:-}" ]; then model=(--model "$1"); else model=(--skip agreement,speed); fi
timeout 300 python3 benchmarks/gpu_engine.py "${model[@]}" 2>&1 | grep -v '^INFO' | tee "$out/gpu_engine.md"
