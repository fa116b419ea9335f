"""One partition per MLflow run id: every asset of a training run is materialised per run."""

import dagster as dg

mlflow_runs = dg.DynamicPartitionsDefinition(name="mlflow_runs")
