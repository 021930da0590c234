# The two commands: `make run` and `make test`. Both create the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
#: what running needs: the package and the embedded Postgres (the [embedded] extra)
RUN_STAMP := $(VENV)/.installed-run
#: and what developing needs: tests, linters, benchmarks (the [dev] extra)
STAMP := $(VENV)/.installed

.PHONY: run test check lint typecheck services browser bench bench-quick chaos clean dist venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) -e '.[embedded]'
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) -e '.[dev,embedded]'
	touch $(STAMP) $(RUN_STAMP)

venv: $(STAMP)

## run the relay: embedded Postgres and stdout unless DATABASE_URL / OUTBOX_TRANSPORT say otherwise
run: $(RUN_STAMP)
	$(BIN)/outbox db upgrade
	exec $(BIN)/outbox run

## ruff, mypy --strict, then the whole suite, with the services it needs started when they
## are installed but down
test: $(STAMP) services browser
	$(BIN)/ruff check outbox migrations tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest

services:
	bash scripts/ensure-services

## Debian's chromium for the console's browser tests (installed when missing)
browser:
	bash scripts/ensure-browser

lint: $(STAMP)
	$(BIN)/ruff check outbox migrations tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

check: test

## a wheel of this source tree in dist/ (what the container recipe in docs/operations.md installs)
dist: $(RUN_STAMP)
	rm -rf dist
	$(BIN)/python -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir dist .

bench: $(STAMP) services
	$(BIN)/python -m bench.run

bench-quick: $(STAMP) services
	$(BIN)/python -m bench.run --quick

chaos: $(STAMP) services
	$(BIN)/python -m bench.chaos

clean:
	rm -rf $(VENV) .outbox build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
