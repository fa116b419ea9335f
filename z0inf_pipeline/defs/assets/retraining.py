"""Stage 8: retrain the parent's recipe on the curated training set, as a new MLflow run tagged with its parent."""

import dagster as dg
import numpy as np
import pandas as pd

from ...influence.analysis import write_frame
from ...influence.errors import InfluenceInputError
from ...review import CuratedSet, retrain_config
from ...tracking import train_and_log
from ...tracking.logger import retrained_run_name
from ...training import TrainConfig
from ..config import RetrainConfig
from ..metadata import layout_for, path_metadata
from ..partitions import mlflow_runs
from ..resources import MlflowResource
from .curation import curated_training_set


def curated_from_file(layout) -> CuratedSet:
    """The curation exactly as materialised: drops = training ids missing from the curated set."""
    examples = pd.read_parquet(layout.examples)
    train_ids = examples.loc[examples["split"] == "train", "example_id"].to_numpy(np.int64)
    frame = pd.read_parquet(layout.curated_set)
    dropped = np.setdiff1d(train_ids, frame["example_id"].to_numpy(np.int64))
    relabelled = frame[frame["action"] == "relabel"]
    relabels = {int(i): int(y) for i, y in zip(relabelled["example_id"], relabelled["label"])}
    return CuratedSet(frame, tuple(int(i) for i in dropped), relabels)


@dg.asset(partitions_def=mlflow_runs, group_name="z0inf", deps=[curated_training_set], kinds={"pytorch", "mlflow"})
def retrained_run(
    context: dg.AssetExecutionContext, config: RetrainConfig, mlflow: MlflowResource
) -> dg.MaterializeResult:
    """Train the parent run's recipe again without the dropped examples and with the relabels; log it as
    a new contract run tagged ``z0inf.parent_run_id`` (the sensor then analyses it like any other run)."""
    layout = layout_for(context)
    parent = mlflow.fetch(layout.run_id)
    if parent.train_config is None:
        raise InfluenceInputError(
            f"run {parent.run_id}: has no training config (train_config.json), so its recipe cannot be retrained here"
        )
    curated = curated_from_file(layout)
    child_config = retrain_config(TrainConfig.from_dict(parent.train_config), curated)
    context.log.info(
        f"retraining {parent.run_id} without {len(curated.dropped_ids)} examples, {len(curated.relabels)} relabelled"
    )
    client = mlflow.client()
    child_id = train_and_log(
        child_config,
        tracking_uri=mlflow.uri(),
        experiment=config.experiment,
        parent_run_id=parent.run_id,
        run_name=retrained_run_name(client.get_run(parent.run_id).info.run_name),
        tags={
            "z0inf.dropped": len(curated.dropped_ids),
            "z0inf.relabelled": len(curated.relabels),
            "z0inf.dagster_run_id": context.run.run_id,
        },
    )
    parent_metrics = client.get_run(parent.run_id).data.metrics
    child_metrics = client.get_run(child_id).data.metrics
    summary = pd.DataFrame(
        [
            {
                "parent_run_id": parent.run_id,
                "retrained_run_id": child_id,
                "train_examples": curated.size,
                "dropped": len(curated.dropped_ids),
                "relabelled": len(curated.relabels),
                "parent_test_accuracy": parent_metrics.get("test_accuracy", np.nan),
                "retrained_test_accuracy": child_metrics.get("test_accuracy", np.nan),
            }
        ]
    )
    write_frame(summary, layout.retrained)
    client.set_tag(parent.run_id, "z0inf.retrained_run_id", child_id)
    mlflow.log_outputs(
        parent.run_id,
        "retrained_run",
        [layout.retrained],
        {"z0inf.retrained_test_accuracy": summary.at[0, "retrained_test_accuracy"]},
    )
    row = summary.iloc[0]
    context.log.info(
        f"retrained run {child_id}: test accuracy {row['parent_test_accuracy']:.4f} -> "
        f"{row['retrained_test_accuracy']:.4f}"
    )
    return dg.MaterializeResult(
        metadata={
            "retrained_run_id": child_id,
            "retrained_run": mlflow.run_link(child_id),
            "parent_run_id": parent.run_id,
            "train_examples": curated.size,
            "dropped": len(curated.dropped_ids),
            "relabelled": len(curated.relabels),
            "parent_test_accuracy": float(row["parent_test_accuracy"]),
            "retrained_test_accuracy": float(row["retrained_test_accuracy"]),
            **path_metadata(retrained_run=layout.retrained),
        }
    )
