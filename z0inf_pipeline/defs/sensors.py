"""Sensor: every new FINISHED contract run in MLflow becomes a partition and gets an influence run."""

import json

import dagster as dg

from .jobs import influence_job
from .partitions import mlflow_runs
from .resources import MlflowResource, MlflowUnavailable


def _seen(cursor: str | None) -> set[str]:
    return set(json.loads(cursor)) if cursor else set()


@dg.sensor(job=influence_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def new_mlflow_runs(context: dg.SensorEvaluationContext, mlflow: MlflowResource):
    """Poll MLflow for FINISHED contract runs not seen before. Each one is added as a partition and
    requested once (run_key = the MLflow run id). Runs already registered as partitions by someone
    else (``z0inf demo``, the UI) are only remembered. If MLflow cannot be reached the tick is
    skipped with the reason and the cursor is left alone, so the run is picked up on a later tick."""
    seen = _seen(context.cursor)
    try:
        runs = mlflow.contract_runs()
    except MlflowUnavailable as exc:
        return dg.SkipReason(f"{exc}; will look again on the next tick")
    new = [r for r in runs if r.run_id not in seen]
    if not new:
        return dg.SkipReason(f"no new FINISHED contract runs ({len(runs)} known)")
    registered = set(context.instance.get_dynamic_partitions(mlflow_runs.name))
    fresh = [r.run_id for r in new if r.run_id not in registered]
    cursor = json.dumps(sorted(seen | {r.run_id for r in new}))
    context.log.info(f"{len(new)} new contract run(s); requesting {len(fresh)} influence run(s)")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(run_key=run_id, partition_key=run_id, tags={"mlflow_run_id": run_id}) for run_id in fresh
        ],
        dynamic_partitions_requests=[mlflow_runs.build_add_request(fresh)] if fresh else [],
        cursor=cursor,
    )
