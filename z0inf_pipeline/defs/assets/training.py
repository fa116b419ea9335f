"""Stage 1: the MLflow contract run that the partition names, adopted after validation."""

import dagster as dg
import pandas as pd

from ..metadata import run_id_of
from ..partitions import PER_RUN
from ..resources import MlflowResource


@dg.asset(**PER_RUN, kinds={"mlflow", "parquet"})
def training_run(context: dg.AssetExecutionContext, mlflow: MlflowResource) -> dg.Output[pd.DataFrame]:
    """Download and validate the partition's MLflow run against the run contract (checkpoints, loss
    tables, examples, model spec); its examples table (id, split, label, injected flips) is the output.
    New runs come from ``train_job``, ``z0inf train``, ``z0inf demo`` or the ``retrained_run`` asset."""
    run = mlflow.fetch(run_id_of(context))
    examples = pd.read_parquet(run.examples)
    train = examples[examples["split"] == "train"]
    context.log.info(
        f"adopted MLflow run {run.run_id}: {len(run.checkpoints)} checkpoints, {len(train)} training examples"
    )
    metadata = {
        **mlflow.run_metadata(run.run_id),
        "tracking_uri": mlflow.uri(),
        "checkpoints": len(run.checkpoints),
        "steps": dg.MetadataValue.json(list(run.steps)),
        "train_examples": len(train),
        "test_examples": int((examples["split"] == "test").sum()),
        "injected_label_flips": int(train["flipped"].sum()),
        "parent_run_id": run.tags.get("z0inf.parent_run_id", ""),
        "train_config": dg.MetadataValue.json(run.train_config or {}),
        "model_spec": dg.MetadataValue.json(run.model_spec),
        "dagster/row_count": len(examples),
    }
    return dg.Output(examples, metadata=metadata)
