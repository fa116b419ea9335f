"""One partition per MLflow run id: every asset and check of a training run is materialised per run."""

import dagster as dg

mlflow_runs = dg.DynamicPartitionsDefinition(name="mlflow_runs")

# The IO manager resource that stores assets in their run's folder (``storage.RunOutputsIOManager``).
RUN_OUTPUTS_KEY = "run_outputs"
# The IO manager resource that passes shards between steps (loss tables, projections; ``storage.LossShardsIOManager``).
LOSS_SHARDS_KEY = "loss_shards"
# What every asset of a run shares: its partitions, its group in the UI, where its outputs are stored.
PER_RUN = {"partitions_def": mlflow_runs, "group_name": "z0inf", "io_manager_key": RUN_OUTPUTS_KEY}
