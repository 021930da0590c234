# The two commands: `make run` and `make test`. Both create the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test check lint typecheck services browser bench bench-quick chaos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## run the relay: embedded Postgres and stdout unless DATABASE_URL / OUTBOX_TRANSPORT say otherwise
run: $(STAMP)
	$(BIN)/outbox db upgrade
	exec $(BIN)/outbox run

## the whole suite, with the services it needs started when they are installed but down
test: $(STAMP) services browser
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

check: lint typecheck test

bench: $(STAMP) services
	$(BIN)/python -m bench.run

bench-quick: $(STAMP) services
	$(BIN)/python -m bench.run --quick

chaos: $(STAMP) services
	$(BIN)/python -m bench.chaos

clean:
	rm -rf $(VENV) .outbox build *.egg-info .pytest_cache .mypy_cache .ruff_cache
