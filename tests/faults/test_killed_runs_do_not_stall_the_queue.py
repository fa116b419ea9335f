"""``z0inf materialize`` killed with SIGKILL mid-run leaves no run STARTED for good;
the queue moves on, and the next sensor request completes under the real ``dagster-daemon``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest

from z0inf_pipeline.defs.recovery import HOST_TAG, PID_TAG, PROCESS_START_TAG, fail_orphaned_runs, process_tags
from z0inf_pipeline.tracking import train_and_log
from tests.defs.conftest import REPO_ROOT, TINY



def add_run(instance, status: dg.DagsterRunStatus, tags: dict) -> str:
    run = dg.DagsterRun(job_name="influence_job", run_id=str(uuid.uuid4()), status=status, tags=tags)
    instance.add_run(run)
    return run.run_id


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_only_runs_whose_process_is_gone_are_failed(instance):
    alive = add_run(instance, dg.DagsterRunStatus.STARTED, process_tags())
    dead = add_run(instance, dg.DagsterRunStatus.STARTED, {**process_tags(), PID_TAG: str(dead_pid())})
    reused = add_run(instance, dg.DagsterRunStatus.STARTED, {**process_tags(), PROCESS_START_TAG: "1"})  # pid reused
    elsewhere = add_run(instance, dg.DagsterRunStatus.STARTED, {HOST_TAG: "another-host", PID_TAG: str(dead_pid())})
    untagged = add_run(instance, dg.DagsterRunStatus.STARTED, {})
    assert sorted(fail_orphaned_runs(instance)) == sorted([dead, reused])
    status = {r: instance.get_run_by_id(r).status for r in (alive, dead, reused, elsewhere, untagged)}
    assert status[dead] == status[reused] == dg.DagsterRunStatus.FAILURE
    assert status[alive] == status[elsewhere] == status[untagged] == dg.DagsterRunStatus.STARTED
    assert fail_orphaned_runs(instance) == []


def wait_for(predicate, gave_up, what: str, poll_s: float = 0.5):
    """Poll ``predicate`` until it holds or ``gave_up()`` names an event after which it never will (a
    process that ended): no wall-clock budget, which a busy machine would blow while nothing is wrong."""
    while True:
        value = predicate()
        if value:
            return value
        reason = gave_up()
        if reason:
            pytest.fail(f"waiting for {what}: {reason}")
        time.sleep(poll_s)


def runs_of_pid(pid: int) -> list:
    with dg.DagsterInstance.get() as instance:
        return instance.get_runs(filters=dg.RunsFilter(tags={PID_TAG: str(pid)}))


def kill_materialize_mid_run(run_id: str, copies: int = 2, rounds: int = 5) -> list[str]:
    """Start ``copies`` concurrent ``z0inf materialize influence`` processes and SIGKILL each as soon as its
    Dagster run has started a step; return the killed runs' ids. All of them are watched at once: waiting
    for one after another, a later one could finish its whole (small) run while an earlier one is
    awaited. On a busy machine this watcher may still not get to poll while a whole run goes by: then
    the round starts over with new processes (at most ``rounds`` times), whose ``run_job`` fails the runs
    killed before (``fail_orphaned_runs``), so the outcome depends on events, never on the watcher's speed."""
    ended_unkilled: list[int] = []
    for _ in range(rounds):
        processes = [
            subprocess.Popen([sys.executable, "-m", "z0inf_pipeline.cli", "materialize", "influence", "--run", run_id],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
            for _ in range(copies)
        ]
        killed: dict[int, str] = {}
        try:
            def kill_those_mid_run():
                for process in processes:
                    if process.pid not in killed and (started := started_step(process)):
                        process.send_signal(signal.SIGKILL)
                        killed[process.pid] = started
                ended = [p.pid for p in processes if p.pid not in killed and p.poll() is not None]
                ended_unkilled.extend(ended)
                return "ended" if ended else len(killed) == len(processes)

            if wait_for(kill_those_mid_run, lambda: None, f"{copies} materialize runs to start a step", 0.1) is True:
                return [killed[p.pid] for p in processes]
        finally:
            for process in processes:
                process.kill()
                process.wait()
    pytest.fail(f"materialize processes {ended_unkilled} ended before a step was seen, in each of {rounds} rounds")


def started_step(process) -> str | None:
    """The Dagster run of a ``z0inf materialize`` process, once it is STARTED and has started a step."""
    runs = runs_of_pid(process.pid)
    if not runs or runs[0].status != dg.DagsterRunStatus.STARTED:
        return None
    with dg.DagsterInstance.get() as instance:
        return runs[0].run_id if instance.get_run_step_stats(runs[0].run_id) else None


@pytest.mark.dagster_daemon
def test_killed_materialize_runs_do_not_stall_the_queue(tracking_uri, dagster_home, contract_run, tmp_path):
    killed = kill_materialize_mid_run(contract_run)
    with dg.DagsterInstance.get() as instance:
        assert [instance.get_run_by_id(r).status for r in killed] == [dg.DagsterRunStatus.STARTED] * 2
        assert instance.get_runs_count(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])) == 2  # = max_concurrent_runs

    new_run = train_and_log(TINY, tracking_uri=tracking_uri)  # what the sensor should pick up next
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-m", "z0inf_pipeline.definitions"],
            cwd=REPO_ROOT, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        def finished_request():
            with dg.DagsterInstance.get() as instance:
                runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": new_run}))
            done = [r for r in runs if r.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)]
            return done[0] if done else None

        def daemon_ended():
            return None if daemon.poll() is None else f"dagster-daemon exited: {log_path.read_text()[-3000:]}"

        run = wait_for(finished_request, daemon_ended, "the sensor's request to finish", poll_s=2)
        assert run.status == dg.DagsterRunStatus.SUCCESS, log_path.read_text()[-3000:]
        assert run.tags.get("dagster/sensor_name") == "new_mlflow_runs"
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
    with dg.DagsterInstance.get() as instance:
        for run_id in killed:
            assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
            messages = [e.message for e in instance.all_logs(run_id) if e.message]
            assert any("is gone: it was killed or crashed" in m for m in messages)
