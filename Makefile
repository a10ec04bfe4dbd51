# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LLAMA_CPP_VERSION := 0.3.36
WHEELS := $(or $(TOKENMILL_HOME),$(HOME)/.cache/tokenmill)/wheels
PROMPT ?= The capital of France is

.PHONY: run test model bench llama-cpp clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

model: $(STAMP)
	$(PY) -m tokenmill.cli fetch

# llama.cpp (the tokenizer and speed reference) builds from source in ~12 min; the wheel is cached.
llama-cpp: $(STAMP)
	@$(PY) -c "import llama_cpp" 2>/dev/null || { \
	  ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	    CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip wheel --no-deps llama-cpp-python==$(LLAMA_CPP_VERSION) -w $(WHEELS); \
	  $(PY) -m pip install -q $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl; }

run: model
	$(VENV)/bin/tokenmill generate --max-tokens 48 "$(PROMPT)"

test: model llama-cpp
	$(PY) -m pytest -q

bench: model llama-cpp
	$(PY) benchmarks/engine.py

clean:
	rm -rf $(VENV)
