# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch 2.13.0 lies on this kind of machine's disk; install it before the project so the
# project's torch range is already satisfied (a newer torch would pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint venv clean bench

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

venv: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/python -m looplm.platform.demo $(DEMO_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(BIN)/.installed lint
	$(BIN)/python -m pytest

bench: $(BIN)/.installed
	$(BIN)/python bench/model_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
