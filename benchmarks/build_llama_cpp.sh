#!/usr/bin/env bash
# llama.cpp's own tools (llama-bench, llama-batched-bench, llama-server, llama-perplexity), built once
# with cmake from the source vendored in the llama-cpp-python sdist, cached under the tokenmill home.
# The fair speed anchors: llama-cpp-python's server runs one sequence at a time.
# LLAMA_ISA=avx512 builds a second set with AVX-512, VNNI and BF16 (into llama.cpp-VERSION-avx512), the fair
# anchor where tokenmill's kernels run their VNNI build; the benchmarks take it where it exists and the CPU has VNNI.
set -euo pipefail
VERSION=${LLAMA_CPP_VERSION:-0.3.36}
HOME_DIR=${TOKENMILL_HOME:-$HOME/.cache/tokenmill}
ISA=${LLAMA_ISA:-avx2}
case $ISA in
  avx2) OUT=$HOME_DIR/llama.cpp-$VERSION; EXTRA=() ;;
  avx512) OUT=$HOME_DIR/llama.cpp-$VERSION-avx512
          EXTRA=(-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=OFF) ;;
  *) echo "LLAMA_ISA must be avx2 or avx512, not '$ISA'" >&2; exit 2 ;;
esac
PY=${PY:-.venv/bin/python}
if [ -x "$OUT/bin/llama-bench" ]; then echo "$OUT/bin"; exit 0; fi
mkdir -p "$OUT/src"
SDIST=$HOME_DIR/llama.cpp-$VERSION/src     # the avx2 set's download serves both
[ "$ISA" != avx2 ] && [ -f "$SDIST/llama_cpp_python-$VERSION.tar.gz" ] && cp -n "$SDIST/llama_cpp_python-$VERSION.tar.gz" "$OUT/src/"
[ -f "$OUT/src/llama_cpp_python-$VERSION.tar.gz" ] || \
  $PY -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$OUT/src"
tar -xzf "$OUT/src/llama_cpp_python-$VERSION.tar.gz" -C "$OUT/src"
SRC=$OUT/src/llama_cpp_python-$VERSION/vendor/llama.cpp
# portable x86-64 (AVX2): -march=native picked up instructions some VMs here advertise but trap
cmake -S "$SRC" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
  -DGGML_FMA=ON -DGGML_F16C=ON "${EXTRA[@]}" -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$OUT/build" -j "$(nproc)" --target llama-bench llama-batched-bench llama-server llama-perplexity >&2
mkdir -p "$OUT/bin"
cp "$OUT/build/bin/"llama-{bench,batched-bench,server,perplexity} "$OUT/bin/"
echo "$OUT/bin"
