# Two entry points for a fresh machine with only Python 3.11 and pip:
#   make run   - set up .venv and run the main job on the embedded default (digits pipeline,
#                one process per stage on this machine)
#   make test  - set up .venv, lint, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run lsq test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,plot]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/aimcpipe train configs/digits-analog.yaml --backend torch --out runs/digits --force

lsq: $(STAMP)
	$(BIN)/aimcpipe lsq --out runs/lsq --force

lint: $(STAMP)
	$(BIN)/ruff check aimcpipe tests benchmarks
	$(BIN)/ruff format --check aimcpipe tests benchmarks

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
