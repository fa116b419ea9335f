"""Running the Dagster jobs of one MLflow run in this process, on the DAGSTER_HOME instance: what
``z0inf materialize``, ``z0inf demo`` and the review page's retrain button share."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Z0infError, named_error
from ..review.policy import FlagPolicy

_QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


class _ShutGateNotice(logging.Filter):
    """Drops Dagster's warning that a blocking check "emitted no result": it is logged when
    ``curated_training_set`` yields nothing because the review gate is shut (its check is then skipped),
    which the gate's own message already says (the retrain's steps are skipped, as intended).

    Dagster's module loggers have no handler, so Python prints their warnings through
    ``logging.lastResort``; the filter sits there, on the record's logger family and message, so it
    names no Dagster module and leaves every other warning (and any handler a user configures) alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("dagster") and "emitted no result" in record.getMessage())


def quiet_shut_gate_notice() -> None:
    """Install ``_ShutGateNotice`` on Python's last-resort handler (once)."""
    handler = logging.lastResort
    if handler is not None and not any(isinstance(f, _ShutGateNotice) for f in handler.filters):
        handler.addFilter(_ShutGateNotice())


def policy_run_config(policy: FlagPolicy) -> dict:
    """The run config that builds the review queue with ``policy``."""
    return {"ops": {"review_queue": {"config": policy.to_dict()}}}


@dataclass
class JobOutcome:
    """What one Dagster run did: success, per-step seconds, check results, failure messages."""

    job: str
    dagster_run_id: str
    success: bool
    step_seconds: dict[str, float] = field(default_factory=dict)
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    named_error: Z0infError | None = None  # the first failed step's cause, when it is one of the named errors

    def check_failed(self, name: str) -> bool:
        return name in self.checks and not self.checks[name][0]


def dagster_instance():
    """The DAGSTER_HOME instance (runs show up in the UI), else a throwaway one."""
    import dagster as dg

    if os.environ.get("DAGSTER_HOME"):
        Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
        return dg.DagsterInstance.get(), True
    return dg.DagsterInstance.ephemeral(), False


def run_job(instance, job: str, run_id: str, run_config: dict | None = None) -> JobOutcome:
    """Execute a partitioned job for ``run_id`` in this process (adding the partition if needed)."""
    from ..definitions import defs
    from ..defs.partitions import mlflow_runs
    from ..defs.recovery import fail_orphaned_runs, process_tags

    fail_orphaned_runs(instance)  # runs of killed z0inf processes would hold queue slots for ever
    quiet_shut_gate_notice()
    if not instance.has_dynamic_partition(mlflow_runs.name, run_id):
        instance.add_dynamic_partitions(mlflow_runs.name, [run_id])
    result = defs.resolve_job_def(job).execute_in_process(
        instance=instance, partition_key=run_id, run_config={**_QUIET, **(run_config or {})}, raise_on_error=False,
        tags=process_tags(),
    )
    stats = instance.get_run_step_stats(result.run_id)
    outcome = JobOutcome(
        job,
        result.run_id,
        result.success,
        step_seconds={s.step_key: (s.end_time or s.start_time) - s.start_time for s in stats if s.start_time},
        checks={e.check_name: (e.passed, e.description or "") for e in result.get_asset_check_evaluations()},
    )
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE" and event.step_failure_data.error is not None:
            error = event.step_failure_data.error
            outcome.failures.append(f"{event.step_key}: {failure_cause(error)}")
            while error.cause is not None:
                error = error.cause
            if outcome.named_error is None:
                outcome.named_error = named_error(error.cls_name, error.message.strip(), where=f"{event.step_key}: ")
    return outcome


def failure_cause(error) -> str:
    """The innermost error of a failed step, without Dagster's "Error occurred while executing op"
    wrapper or the module path: what the asset or check itself said."""
    while error.cause is not None:
        error = error.cause
    head, separator, text = error.message.strip().partition(": ")
    if not separator or head.rsplit(".", 1)[-1] != error.cls_name:
        return error.message.strip()
    return text if error.cls_name == "Failure" else f"{error.cls_name}: {text}"
