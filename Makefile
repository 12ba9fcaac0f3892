# Two commands: `make run` serves the demo console, `make test` runs the whole suite.
# Both install .venv from uv.lock exactly (hashes checked, nothing re-resolved) and are idempotent.
PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# uv never downloads an interpreter: it uses $(PYTHON), which must satisfy requires-python.
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: run test lint lint-imports bench venv clean sandbox lock lock-check

# uv itself is pinned and kept apart in .tools/, so the project's venv holds exactly the lock. pip --target
# takes about 2 s; a Python without pip (Debian's without python3-pip) gets a small venv instead (about 9 s).
$(UV):
	if $(PYTHON) -m pip --version >/dev/null 2>&1; then \
	  $(PYTHON) -m pip install -q --target $(TOOLS) "uv==$(UV_VERSION)"; \
	else \
	  $(PYTHON) -m venv $(TOOLS)/venv && $(TOOLS)/venv/bin/python -m pip install -q --target $(TOOLS) "uv==$(UV_VERSION)"; \
	fi
	test -x $(UV)

# --frozen installs exactly what uv.lock says (with its hashes) and never resolves.
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --extra dev --python $(PYTHON) -q
	touch $(STAMP)

venv: $(STAMP)

# Refresh the lock after editing pyproject.toml (`make lock LOCK_ARGS=--upgrade` moves every pin to the newest allowed).
lock: | $(UV)
	$(UV) lock --python $(PYTHON) $(LOCK_ARGS)

# Fails when pyproject.toml and uv.lock disagree (CI runs it).
lock-check: | $(UV)
	$(UV) lock --check --python $(PYTHON)

run: $(STAMP)
	CRMBRIDGE_DEMO=1 $(BIN)/crmbridge db upgrade
	CRMBRIDGE_DEMO=1 $(BIN)/python -m core.runner

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: lint-imports
	$(BIN)/ruff check core pages sandbox bench tests dashboard.py server.py
	$(BIN)/mypy core

# The import contracts in .importlinter (layers, no cycles, sandbox and providers apart); counts imports
# inside functions too.
lint-imports: $(STAMP)
	$(BIN)/lint-imports --no-cache --no-logo

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(TOOLS) data/*.db data/*.db-* .pytest_cache
