"""Crash recovery for runs executed in a CLI process (``z0inf materialize``, ``z0inf demo``).

Such a run is not launched by a run launcher, so Dagster's run monitoring has no worker to ask about:
if its process is killed (``kill -9``, OOM, a closed laptop) the run stays STARTED for good, and the
queue (``max_concurrent_runs``) counts it for ever. So every in-process run is tagged with the
process that executes it (host, pid, the process's start time, so a reused pid is not mistaken for
it), and ``fail_orphaned_runs`` marks a STARTED run failed once that process is gone. It runs before
every in-process run and in the daemon, as the ``orphaned_runs`` sensor.
"""

from __future__ import annotations

import os
import socket

import dagster as dg
import psutil

HOST_TAG = "z0inf/host"
PID_TAG = "z0inf/pid"
PROCESS_START_TAG = "z0inf/process_start"
_IN_PROGRESS = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def _process_start(pid: int) -> str | None:
    """When the process started (``psutil``, seconds since the epoch); None when it is gone or unknown."""
    try:
        return repr(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return None


def process_tags() -> dict[str, str]:
    """Tags naming this process, for a run it executes itself."""
    pid = os.getpid()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), PROCESS_START_TAG: _process_start(pid) or ""}


def _process_gone(tags: dict) -> bool:
    """Whether the process a run's tags name has ended. Only decidable on the same host."""
    if tags.get(HOST_TAG) != socket.gethostname():
        return False
    try:
        pid = int(tags[PID_TAG])
        os.kill(pid, 0)
    except (KeyError, ValueError):
        return False
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    recorded = tags.get(PROCESS_START_TAG)
    return bool(recorded) and _process_start(pid) not in (None, recorded)  # the pid now names another process


def fail_orphaned_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed every in-progress run whose executing process on this host has died; return their ids."""
    records = instance.get_run_records(filters=dg.RunsFilter(statuses=_IN_PROGRESS, tags={HOST_TAG: socket.gethostname()}))
    failed = []
    for record in records:
        run = record.dagster_run
        if _process_gone(run.tags):
            instance.report_run_failed(
                run, f"the process executing this run (pid {run.tags[PID_TAG]} on {run.tags[HOST_TAG]}) is gone: "
                "it was killed or crashed, so the run can never finish"
            )
            failed.append(run.run_id)
    return failed


@dg.sensor(minimum_interval_seconds=15, default_status=dg.DefaultSensorStatus.RUNNING)
def orphaned_runs(context: dg.SensorEvaluationContext):
    """Fail runs whose in-process executor died, so the run queue moves on (see the module docstring)."""
    failed = fail_orphaned_runs(context.instance)
    if failed:
        context.log.info(f"marked {len(failed)} orphaned run(s) failed: {failed}")
    return dg.SkipReason(f"{len(failed)} orphaned run(s) marked failed" if failed else "no orphaned runs")
