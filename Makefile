# The README's two commands are `make run` and `make test`; .ci/run calls `make test`.
# Both set everything up first (virtual environment, packages, dataset) and are idempotent.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bnutils-installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9A-Z]*.ipynb)) $(sort $(wildcard notebooks/drafts/*.ipynb))

.PHONY: run test setup data lint unit unit-slow nbval results benchmarks format

## make run: set up, then execute every notebook in place (profile: $BNUTILS_PROFILE, default full),
## reading training runs from their committed records; `make run FRESH=1` retrains them all
## (stopped and started again, it resumes). Progress: results/logs/run.log
run: setup
	$(BIN)/python tools/notebooks.py run $(if $(FRESH),--fresh)

## make test: set up, then lint, fast unit tests, notebooks under nbval (quick profile);
## the slow unit tests (marked `slow`: real models, subprocesses, training) run with `make unit-slow`
test: setup lint unit nbval

setup: $(STAMP) data

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

data: $(STAMP)
	bash tools/ensure_data.sh $(BIN)/python

LINTED := bnutils tests tools benchmarks scripts notebooks

lint: setup
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

unit: setup
	BNUTILS_PROFILE=quick $(BIN)/python -m pytest -q -m "not slow" tests

unit-slow: setup
	BNUTILS_PROFILE=quick $(BIN)/python -m pytest -q -m slow tests

nbval: setup
	TF_CPP_MIN_LOG_LEVEL=2 BNUTILS_PROFILE=quick $(BIN)/python -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env $(NOTEBOOKS)

## make results: rebuild the README's results table and figures from saved result files
results: setup
	$(BIN)/python tools/results_table.py

## make format: format and fix everything the lint target checks
format: setup
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)
