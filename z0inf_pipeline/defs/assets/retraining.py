"""Stage 8: retrain the parent's recipe on the curated training set, as a new MLflow run tagged with its parent."""

import dagster as dg
import numpy as np
import pandas as pd

from ...errors import InputError
from ...integrations import train_and_log_recipe
from ...review import CuratedSet, retrain_config
from ...review.curation import relabels_of, target_edits_of
from ...review.lineage import DECISIONS_THROUGH
from ...tracking.logger import retrained_run_name
from ...training.lm import recipe_from_dict
from ..config import RetrainConfig
from ..metadata import rounded, run_id_of, split_ids
from ..partitions import PER_RUN
from ..resources import MlflowResource


def curated_from_frame(curated: pd.DataFrame, examples: pd.DataFrame) -> CuratedSet:
    """The curation exactly as materialised: drops = training ids missing from the curated set."""
    dropped = np.setdiff1d(split_ids(examples), curated["example_id"].to_numpy(np.int64))
    return CuratedSet(curated, tuple(int(i) for i in dropped), relabels_of(curated), target_edits_of(curated))


def decisions_through(curated: pd.DataFrame) -> int:
    """The store's high-water mark the curated set applied (``curated_training_set`` records it)."""
    if DECISIONS_THROUGH not in curated.attrs:
        raise dg.Failure(
            "curated_training_set: records no decisions_through (written by an older version); "
            "materialise curated_training_set again (retrain_job)"
        )
    return int(curated.attrs[DECISIONS_THROUGH])


_RETRAINING_JOBS = ("retrain_job", "pipeline_job")
_IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
              dg.DagsterRunStatus.STARTED]


def refuse_second_retrain(context: dg.AssetExecutionContext, run_id: str) -> None:
    """One child per round: a retrain of ``run_id`` while another is in flight, or one that another
    finished while this one waited, fails naming the other (the earliest-launched one goes on)."""
    instance = context.instance
    this = instance.get_run_record_by_id(context.run_id)
    others = [
        r for r in instance.get_run_records(dg.RunsFilter(tags={"dagster/partition": run_id}, statuses=_IN_FLIGHT))
        if r.dagster_run.run_id != context.run_id and r.dagster_run.job_name in _RETRAINING_JOBS
        and r.create_timestamp < this.create_timestamp
    ]
    if others:
        first = min(others, key=lambda r: r.create_timestamp).dagster_run
        raise dg.Failure(
            f"run {run_id}: is already being retrained by Dagster run {first.run_id} ({first.job_name}, "
            f"{first.status.value}); one retrain per round: wait for it (a run whose process died is failed by "
            "the orphaned_runs sensor or the next `z0inf materialize`)"
        )
    latest = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("retrained_run"), asset_partitions=[run_id]), limit=1
    ).records
    if latest and latest[0].run_id != context.run_id and latest[0].timestamp > this.create_timestamp.timestamp():
        raise dg.Failure(
            f"run {run_id}: was retrained by Dagster run {latest[0].run_id} while this retrain waited; one retrain "
            "per round: review that retrained run"
        )


@dg.asset(**PER_RUN, kinds={"pytorch", "mlflow"})
def retrained_run(
    context: dg.AssetExecutionContext,
    config: RetrainConfig,
    curated_training_set: pd.DataFrame,
    training_run: pd.DataFrame,
    mlflow: MlflowResource,
) -> dg.Output[pd.DataFrame]:
    """Train the parent run's recipe again without the dropped examples, with the relabels and the edited
    target texts; log it as
    a new contract run tagged ``z0inf.parent_run_id`` (the sensor then analyses it like any other run).
    One child per round: refused while another retrain of the run, launched earlier, is in flight.
    The output is a one-row summary: parent, retrained run, sizes, test accuracy of both."""
    refuse_second_retrain(context, run_id_of(context))
    parent = mlflow.fetch(run_id_of(context))
    if parent.train_config is None:
        raise InputError(
            f"run {parent.run_id}: has no training config (train_config.json), so its recipe cannot be retrained here"
        )
    curated = curated_from_frame(curated_training_set, training_run)
    through = decisions_through(curated_training_set)
    child_config = retrain_config(recipe_from_dict(parent.train_config), curated)
    context.log.info(
        f"retraining {parent.run_id} without {len(curated.dropped_ids)} examples, {len(curated.relabels)} relabelled, "
        f"{len(curated.target_edits)} with an edited target text"
    )
    client = mlflow.client()
    parent_record = client.get_run(parent.run_id)  # its name and metrics, asked once
    child_id = train_and_log_recipe(
        child_config,
        tracking_uri=mlflow.uri(),
        experiment=config.experiment,
        parent_run_id=parent.run_id,
        run_name=retrained_run_name(parent_record.info.run_name),
        tags={
            "z0inf.dropped": len(curated.dropped_ids),
            "z0inf.relabelled": len(curated.relabels),
            "z0inf.target_edits": len(curated.target_edits),
            "z0inf.dagster_run_id": context.run.run_id,
            f"z0inf.{DECISIONS_THROUGH}": through,
        },
    )
    parent_accuracy = parent_record.data.metrics.get("test_accuracy", np.nan)
    child_accuracy = client.get_run(child_id).data.metrics.get("test_accuracy", np.nan)
    summary = pd.DataFrame(
        [
            {
                "parent_run_id": parent.run_id,
                "retrained_run_id": child_id,
                "train_examples": curated.size,
                "dropped": len(curated.dropped_ids),
                "relabelled": len(curated.relabels),
                "target_edits": len(curated.target_edits),
                "parent_test_accuracy": parent_accuracy,
                "retrained_test_accuracy": child_accuracy,
                DECISIONS_THROUGH: through,
            }
        ]
    )
    client.set_tag(parent.run_id, "z0inf.retrained_run_id", child_id)
    mlflow.log_metrics(parent.run_id, {"z0inf.retrained_test_accuracy": child_accuracy})
    context.log.info(f"retrained run {child_id}: test accuracy {parent_accuracy:.4f} -> {child_accuracy:.4f}")
    return dg.Output(
        summary,
        metadata={
            **mlflow.run_metadata(child_id, prefix="retrained_run"),
            **mlflow.run_metadata(parent.run_id, prefix="parent_run"),
            "train_examples": curated.size,
            "dropped": len(curated.dropped_ids),
            "relabelled": len(curated.relabels),
            "target_edits": len(curated.target_edits),
            "parent_test_accuracy": rounded(parent_accuracy),
            "retrained_test_accuracy": rounded(child_accuracy),
            DECISIONS_THROUGH: through,
        },
    )
