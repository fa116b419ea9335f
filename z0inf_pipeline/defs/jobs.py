"""Jobs. The review gate is checked in the same job as the retraining it guards (``retrain_job``): while
it is shut, ``curated_training_set`` yields nothing and the retraining steps are skipped."""

import dagster as dg

from ..tracking import train_and_log
from ..training import TrainConfig
from .assets import ALL_ASSETS, INFLUENCE_ASSETS, RETRAIN_ASSETS
from .config import TrainingConfig
from .partitions import mlflow_runs
from .resources import MlflowResource

_GATE = dg.AssetCheckKey(dg.AssetKey("review_queue"), "review_gate")

influence_job = dg.define_asset_job(
    "influence_job",
    selection=dg.AssetSelection.assets(*INFLUENCE_ASSETS) - dg.AssetSelection.checks(_GATE),
    partitions_def=mlflow_runs,
    description="Adopt a contract run and compute loss tables, Gram, self-influence, top-k influence and the "
    "review queue, with their data checks (the sensor launches this for every new MLflow run).",
)

retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=dg.AssetSelection.assets(*RETRAIN_ASSETS),
    partitions_def=mlflow_runs,
    description="Rebuild the review queue, check the review gate, curate the training set and retrain: while "
    "the gate is shut the run succeeds with curation and retraining skipped.",
)

pipeline_job = dg.define_asset_job(
    "pipeline_job",
    selection=dg.AssetSelection.assets(*ALL_ASSETS),
    partitions_def=mlflow_runs,
    description="The whole graph for one MLflow run, every check included.",
)


@dg.op(description="Train a recipe and log it as a new contract run; the sensor then analyses it.")
def train_contract_run(context: dg.OpExecutionContext, config: TrainingConfig, mlflow: MlflowResource) -> str:
    run_id = train_and_log(
        config.settings(TrainConfig),
        tracking_uri=mlflow.uri(),
        experiment=config.experiment,
        tags={"z0inf.dagster_run_id": context.run_id},
    )
    context.log.info(f"logged contract run {run_id} to {mlflow.uri()}")
    context.add_output_metadata(mlflow.run_metadata(run_id))
    return run_id


@dg.job(
    description="Train per the launchpad's TrainingConfig and log a contract run to MLflow; the "
    "new_mlflow_runs sensor adds it as a partition and runs influence_job on it."
)
def train_job():
    train_contract_run()


ALL_JOBS = [influence_job, retrain_job, pipeline_job, train_job]
