# One command sets up and runs the main job; one sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME := $(CURDIR)/dagster_home
export Z0INF_DATA_DIR ?= $(CURDIR)/data

.PHONY: setup demo test bench dev clean

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements/constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[dev,bench,deploy]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/z0inf demo --auto-review

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/estimators.py

dev: $(STAMP)
	$(BIN)/dagster dev -h 127.0.0.1

clean:
	rm -rf $(VENV) data
