# Two commands: `make run` serves the demo console, `make test` runs the whole suite.
# Both bootstrap .venv from pyproject.toml and are idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test lint bench venv clean sandbox

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	CRMBRIDGE_DEMO=1 $(BIN)/crmbridge db upgrade
	CRMBRIDGE_DEMO=1 $(BIN)/python -m core.runner

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check core pages sandbox bench tests dashboard.py server.py
	$(BIN)/mypy core

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) data/*.db data/*.db-* .pytest_cache
