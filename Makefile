# One command sets up and runs the main job; one sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME := $(CURDIR)/dagster_home
export Z0INF_DATA_DIR ?= $(CURDIR)/data

REVIEW_ARGS ?=
MLFLOW_PORT ?= 5000

.PHONY: setup demo test bench dev review mlflow-ui clean

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements/constraints.txt torch==2.13.0
	# setuptools' "Editable installation" banner warns about a folder named like the package: that folder is the package
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[dev,bench,deploy,hf,trak]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/z0inf demo
	@echo
	@echo "next: make review (round 2 is pending on http://127.0.0.1:8765), make dev (Dagster), make mlflow-ui (MLflow)"
	@echo "to paste the z0inf / mlflow commands above into this shell, first run:"
	@echo "  source $(VENV)/bin/activate && export DAGSTER_HOME=$(DAGSTER_HOME)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/estimators.py

dev: $(STAMP)
	$(BIN)/dagster dev -h 127.0.0.1

# the review page: every flagged example of every run, decisions into data/review.db
review: $(STAMP)
	$(BIN)/z0inf review serve $(REVIEW_ARGS)

# the MLflow UI on the project's store, with the link straight to the model-training runs (no GenAI job
# runner: it would start a pool of worker processes this store never uses)
mlflow-ui: $(STAMP)
	@$(BIN)/python -c "from z0inf_pipeline.tracking.ui_links import print_ui_links; print_ui_links('http://127.0.0.1:$(MLFLOW_PORT)')"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///$(Z0INF_DATA_DIR)/mlflow/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

clean:
	rm -rf $(VENV) data
