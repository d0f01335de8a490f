# Two entry points, each installs what it needs on a fresh machine:
#   make demo   - builds the sample library and runs ckptlab over it
#   make test   - lint + the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/ckptlab: pyproject.toml requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q -c requirements-dev.txt -e '.[dev]'
	touch $(BIN)/ckptlab

venv: $(BIN)/ckptlab

demo: venv
	bash scripts/demo.sh sample-library

lint: venv
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -n 2 -q tests

.PHONY: venv demo lint test
