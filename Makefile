# Two entry points for a fresh machine with only Python 3.11 and pip:
#   make run   - set up .venv and run the main job on the embedded default: measured speedup
#                of the digits analog pipeline at 1, 2 and 4 stages under every policy, one
#                process per stage on this machine, with emulated device time
#   make test  - set up .venv, lint, run the test suite
# and for contributors:
#   make docs  - regenerate docs/config.md from the config schema's docstrings
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run lsq test lint docs bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/aimcpipe speedup configs/digits-analog.yaml --stages 1,2,4 --backend torch \
	    --cycle-s 0.002 --epochs 8 --out runs/speedup --force

lsq: $(STAMP)
	$(BIN)/aimcpipe lsq --out runs/lsq --force

lint: $(STAMP)
	$(BIN)/ruff check aimcpipe tests benchmarks
	$(BIN)/ruff format --check aimcpipe tests benchmarks

test: lint
	$(BIN)/pytest -q

docs: $(STAMP)
	$(BIN)/python -m aimcpipe.launch.config_docs > docs/config.md.tmp
	mv docs/config.md.tmp docs/config.md

clean:
	rm -rf $(VENV) runs .pytest_cache
