"""Stage 1: the MLflow contract run that the partition names, adopted after validation."""

import shutil

import dagster as dg
import pandas as pd

from ...influence.atomic import atomic_output
from ..metadata import layout_for, path_metadata
from ..partitions import mlflow_runs
from ..resources import MlflowResource


@dg.asset(partitions_def=mlflow_runs, group_name="z0inf", kinds={"mlflow", "parquet"})
def training_run(context: dg.AssetExecutionContext, mlflow: MlflowResource) -> dg.MaterializeResult:
    """Download and validate the partition's MLflow run against the run contract (checkpoints, loss
    tables, examples, model spec); keep its examples table. New runs come from ``train_job``,
    ``z0inf train``, ``z0inf demo`` or the ``retrained_run`` asset."""
    layout = layout_for(context)
    run = mlflow.fetch(layout.run_id)
    with atomic_output(layout.examples) as tmp:
        shutil.copyfile(run.examples, tmp)
    examples = pd.read_parquet(layout.examples)
    train = examples[examples["split"] == "train"]
    context.log.info(
        f"adopted MLflow run {run.run_id}: {len(run.checkpoints)} checkpoints, {len(train)} training examples"
    )
    metadata = {
        "mlflow_run_id": run.run_id,
        "mlflow_run": mlflow.run_link(run.run_id),
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
        **path_metadata(examples=layout.examples, run_cache=run.cache_dir),
    }
    return dg.MaterializeResult(metadata=metadata)
