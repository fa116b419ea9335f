"""Everything Dagster shows, assembled from the ``z0inf_pipeline.defs`` package (``dagster dev`` in
the repository root finds this module through ``[tool.dagster]`` in pyproject.toml)."""

import dagster as dg

from z0inf_pipeline.defs.assets import ALL_ASSETS
from z0inf_pipeline.defs.checks import ALL_CHECKS
from z0inf_pipeline.defs.jobs import ALL_JOBS
from z0inf_pipeline.defs.recovery import orphaned_runs
from z0inf_pipeline.defs.resources import ComputeResource, MlflowResource
from z0inf_pipeline.defs.sensors import new_mlflow_runs

defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=ALL_JOBS,
    sensors=[new_mlflow_runs, orphaned_runs],
    resources={"mlflow": MlflowResource(), "compute": ComputeResource()},
    # Stages run one after another, so one process per run saves importing torch and MLflow per step;
    # see the README for the multiprocess or a distributed executor.
    executor=dg.in_process_executor,
)
