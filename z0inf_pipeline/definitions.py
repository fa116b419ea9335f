"""Everything Dagster shows, assembled from the ``z0inf_pipeline.defs`` package (``dagster dev`` in
the repository root finds this module through ``[tool.dagster]`` in pyproject.toml)."""

import dagster as dg

from z0inf_pipeline.defs.assets import ALL_ASSETS
from z0inf_pipeline.defs.checks import ALL_CHECKS
from z0inf_pipeline.defs.jobs import ALL_JOBS
from z0inf_pipeline.defs.partitions import LOSS_SHARDS_KEY, RUN_OUTPUTS_KEY
from z0inf_pipeline.defs.recovery import orphaned_runs
from z0inf_pipeline.defs.resources import ComputeResource, DecisionStoreResource, MlflowResource
from z0inf_pipeline.defs.sensors import new_mlflow_runs
from z0inf_pipeline.defs.storage import LossShardsIOManager, RunOutputsIOManager


def resources(mlflow: MlflowResource | None = None, **overrides) -> dict:
    """The resources of one deployment: by default everything local (SQLite MLflow and decision store,
    outputs under the data directory); pass configured ones to point at shared services."""
    mlflow = mlflow or MlflowResource()
    return {
        "mlflow": mlflow,
        "compute": ComputeResource(),
        "decisions": DecisionStoreResource(),
        RUN_OUTPUTS_KEY: RunOutputsIOManager(mlflow=mlflow),
        LOSS_SHARDS_KEY: LossShardsIOManager(),
        **overrides,
    }


defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=ALL_JOBS,
    sensors=[new_mlflow_runs, orphaned_runs],
    resources=resources(),
    # Stages run one after another, so one process per run saves importing torch and MLflow per step;
    # docs/pipeline.md names the multiprocess and distributed executors.
    executor=dg.in_process_executor,
)
