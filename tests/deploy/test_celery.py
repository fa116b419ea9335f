"""The Celery code location with real parts: Debian's Redis as broker and result store, two
``dagster-celery`` worker processes (one task at a time each, as one worker per GPU would), and
``influence_job`` run on them. Its loss-table and projection shards spread over both workers, a worker SIGKILLed in
the middle of a shard has that shard finished by the other, and the outputs are the same bytes as the
in-process executor's. A run whose broker is down fails at once with a named error.

No GPU here: the GPU-tagged steps go to the ``gpu`` queue, which both CPU workers listen on."""

from __future__ import annotations

import importlib
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from dagster._core.definitions.reconstruct import ReconstructableRepository

from tests.conftest import _stop
from tests.defs.conftest import TINY
from z0inf_pipeline.tracking import train_and_log

pytestmark = pytest.mark.celery

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKERS = ("w1", "w2")
# Small enough that the kill test waits minutes, not hours, for a dead worker's task to be handed on;
# larger than any step of this tiny run takes on a busy machine (the slowest, a worker's first task,
# imports torch, Dagster and MLflow), so no live task is handed on twice.
VISIBILITY_TIMEOUT_S = 120
# A run is waited on while it logs events; one silent for longer than this is stuck. The longest silence
# of a healthy run is the dead worker's task waiting out the visibility timeout (plus the 2 s sweep);
# the rest covers one step of this run on a machine busy with other work.
QUIET_LIMIT_S = VISIBILITY_TIMEOUT_S + 300
# A worker that is still alive but not answering a ping by then is stuck (a slow start on a busy
# machine takes a minute or two; a worker that exits fails the wait at once).
WORKER_START_LIMIT_S = 600
SHARD_STEP = "loss_tables.compute_loss_shard"
PROJECTION_SHARD_STEP = "train_test_influence.compute_projection_shard"
# shards of 3 batches: ~1350 digits for training in 4 shards, ~450 for testing in 2, more than workers
SHARD_SIZE = 384
RUN_CONFIG = {
    "ops": {
        "loss_tables": {"config": {"source": "recompute", "shard_size": SHARD_SIZE}},
        "train_test_influence": {"config": {"shard_size": SHARD_SIZE}},
    },
    "resources": {"compute": {"config": {"batch_size": 128}}},
}


def _celery_module(broker: str):
    """The celery code location as its workers load it: configured from the environment at import."""
    os.environ["Z0INF_CELERY_BROKER"] = broker
    os.environ["Z0INF_CELERY_VISIBILITY_TIMEOUT_S"] = str(VISIBILITY_TIMEOUT_S)
    return importlib.reload(importlib.import_module("z0inf_pipeline.deployments.celery"))


def _influence_job(location: str = "z0inf_pipeline.deployments.celery"):
    return ReconstructableRepository.for_module(location, "defs", str(REPO_ROOT)).get_reconstructable_job(
        "influence_job"
    )


@pytest.fixture(scope="module")
def setting(tmp_path_factory, redis_server):
    """One contract run, the in-process executor's outputs for it, and the environment every process of
    the deployment shares (instance, MLflow store, data and outputs folders)."""
    root = tmp_path_factory.mktemp("celery")
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = {
        "DAGSTER_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "Z0INF_DATA_DIR": str(root / "data"),
        "Z0INF_OUTPUTS_URL": str(root / "reference"),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.delenv("Z0INF_MLFLOW_CONFIG", raising=False)
        for name in ("Z0INF_CELERY_BROKER", "Z0INF_CELERY_VISIBILITY_TIMEOUT_S"):  # restored at the end
            patch.setenv(name, "")
        run_id = train_and_log(TINY)
        with dg.DagsterInstance.get() as instance:
            instance.add_dynamic_partitions("mlflow_runs", [run_id])
            reference = dg.execute_job(
                _influence_job("z0inf_pipeline.definitions"), instance, run_config=RUN_CONFIG,
                tags={"dagster/partition": run_id},
            )
            assert reference.success
        patch.setenv("Z0INF_OUTPUTS_URL", str(root / "celery"))
        module = _celery_module(redis_server.url)
        yield {"root": root, "run_id": run_id, "broker": redis_server.url, "module": module}
    importlib.reload(module)  # back to the environment's settings for later tests


@pytest.fixture
def workers(setting):
    """Two ``dagster-celery`` workers (one task at a time each) on the ``dagster`` and ``gpu`` queues,
    each in its own process group, ready once both answer a ping; ended at teardown."""
    module = setting["module"]
    config = setting["root"] / "worker.yaml"
    settings = module.celery_settings(setting["broker"], visibility_timeout_s=VISIBILITY_TIMEOUT_S)
    config.write_text(yaml.safe_dump({"execution": {"config": settings}}))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    processes = {}
    for name in WORKERS:
        log = (setting["root"] / f"{name}.log").open("wb")
        processes[name] = subprocess.Popen(
            module.worker_command(str(config), name),
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True,
        )
    app = _control_app(setting["broker"])
    deadline = time.monotonic() + WORKER_START_LIMIT_S
    answered: set[str] = set()
    while answered != set(WORKERS):
        dead = [n for n, p in processes.items() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            pytest.fail(f"celery workers {dead or WORKERS} did not start:\n" + _logs(setting["root"]))
        answered = {name.split("@")[0] for reply in app.control.ping(timeout=1.0) for name in reply}
    yield processes
    app.close()  # its broker connections must not outlive the test in this process
    for process in processes.values():
        _stop(process)


def _control_app(broker: str):
    from celery import Celery

    return Celery("z0inf-test", broker=broker, backend=broker)


def _logs(root: Path) -> str:
    return "\n".join(f"--- {name}\n{(root / f'{name}.log').read_text()[-3000:]}" for name in WORKERS)


LAUNCH_TAG = "z0inf/test-launch"


@dataclass
class Launch:
    """A run launched from a thread of this process (its run worker), found by its ``tag``; the thread
    appends the ``ExecuteJobResult`` to ``results``."""

    thread: threading.Thread
    tag: str
    results: list


def _launch(setting, job=None) -> Launch:
    """``job`` (influence_job on the celery location by default), launched in a thread."""
    tag, results = uuid.uuid4().hex, []

    def run():
        with dg.DagsterInstance.get() as instance:
            results.append(dg.execute_job(
                job or _influence_job(), instance, run_config=RUN_CONFIG,
                tags={"dagster/partition": setting["run_id"], LAUNCH_TAG: tag},
            ))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return Launch(thread, tag, results)


class RunEvents:
    """The events of a launched run as they are logged, read from the instance a page at a time, and
    when the last one came: waiting on a run means waiting for its next event, and a run is stuck only
    when it has logged nothing for ``QUIET_LIMIT_S``."""

    def __init__(self, instance: dg.DagsterInstance, launch: Launch):
        self.instance, self.launch = instance, launch
        self.run_id: str | None = None
        self.cursor: str | None = None
        self.last_event_at = time.monotonic()

    def new(self) -> list:
        """The events logged since the last call (none before the run exists)."""
        if self.run_id is None:
            runs = self.instance.get_runs(filters=dg.RunsFilter(tags={LAUNCH_TAG: self.launch.tag}))
            if not runs:
                return []
            self.run_id = runs[0].run_id
        page = self.instance.get_records_for_run(self.run_id, cursor=self.cursor)
        self.cursor = page.cursor
        if page.records:
            self.last_event_at = time.monotonic()
        return [record.event_log_entry for record in page.records]

    def check_not_stuck(self, root: Path) -> None:
        quiet = time.monotonic() - self.last_event_at
        assert quiet < QUIET_LIMIT_S, f"the run logged nothing for {quiet:.0f} s:\n" + _logs(root)


def _ended(setting, launch: Launch) -> dg.ExecuteJobResult:
    """The run's result once it has ended, waited on for as long as it keeps logging events."""
    with dg.DagsterInstance.get() as instance:
        events = RunEvents(instance, launch)
        while launch.thread.is_alive():
            launch.thread.join(1.0)
            events.new()
            events.check_not_stuck(setting["root"])
    assert launch.results, "the run's thread ended without a result"
    return launch.results[0]


def _finished(setting, launch: Launch) -> dg.ExecuteJobResult:
    """The run's result once it has ended successfully."""
    result = _ended(setting, launch)
    assert result.success, _logs(setting["root"])
    return result


def _celery_worker(entry) -> str | None:
    """The worker named by a celery engine event ("Executing steps ... in celery worker"), else None."""
    event = entry.dagster_event
    if event is not None and event.is_engine_event and "in celery worker" in (event.message or ""):
        return event.event_specific_data.metadata["Celery worker"].value.split("@")[0]
    return None


def _worker_of_each_attempt(instance, run_id: str) -> dict[str, list[str]]:
    """Step key -> the workers that picked it up, in order, from the celery engine events."""
    picked: dict[str, list[str]] = {}
    for entry in instance.all_logs(run_id):
        worker = _celery_worker(entry)
        if worker is not None:
            picked.setdefault(entry.dagster_event.step_key, []).append(worker)
    return picked


# The sharded step's outputs: the same bytes whatever executor ran the shards.
SHARDED_OUTPUTS = {"loss_tables/train.parquet", "loss_tables/test.parquet", "predictions.parquet"}


def _output_files(folder: Path) -> list[str]:
    """The run's output files, without GX's store of validation results (one timestamped record per
    validation, not an output of the computation)."""
    files = (p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    return sorted(str(f) for f in files if f.parts[0] != "gx")


def _assert_same_outputs(root: Path, run_id: str) -> None:
    """The run's outputs are the in-process executor's: the same files; the sharded loss tables and
    predictions, and every picture and page, byte for byte; the other tables to float32 precision
    (the estimators' multithreaded float32 reductions over the same loss tables differ in the last
    bits from one process to another, and parquet files keep the folder they were read from in their
    pandas metadata)."""
    reference, celery = root / "reference" / "runs" / run_id, root / "celery" / "runs" / run_id
    files = _output_files(reference)
    assert files and files == _output_files(celery)
    assert SHARDED_OUTPUTS <= set(files)
    for name in files:
        ours, theirs = celery / name, reference / name
        if name in SHARDED_OUTPUTS or Path(name).suffix not in (".parquet", ".csv"):
            assert ours.read_bytes() == theirs.read_bytes(), name
        else:
            read = pd.read_parquet if name.endswith(".parquet") else pd.read_csv
            pd.testing.assert_frame_equal(read(ours), read(theirs), check_exact=False, rtol=1e-6, atol=0)


def test_shards_run_on_both_workers_with_the_in_process_outputs(setting, workers):
    result = _finished(setting, _launch(setting))
    with dg.DagsterInstance.get() as instance:
        picked = _worker_of_each_attempt(instance, result.run_id)
    reference = setting["root"] / "reference" / "runs" / setting["run_id"] / "loss_tables"
    examples = [pq.read_metadata(reference / f"{split}.parquet").num_rows for split in ("train", "test")]
    for step in (SHARD_STEP, PROJECTION_SHARD_STEP):
        shards = {key: names for key, names in picked.items() if key.startswith(step)}
        assert len(shards) == sum(math.ceil(n / SHARD_SIZE) for n in examples) > len(WORKERS), step
        assert all(len(names) == 1 for names in shards.values())
        assert {names[0] for names in shards.values()} == set(WORKERS), step
    _assert_same_outputs(setting["root"], setting["run_id"])


def test_a_shard_whose_worker_is_killed_is_finished_by_the_other_worker(setting, workers):
    """SIGKILL the whole worker (main process and the child running the shard), as a machine that dies,
    as soon as it picks up a shard step: its unacknowledged task goes back to the queue after the
    visibility timeout and the surviving worker runs it; the run completes with the same outputs."""
    launch = _launch(setting)
    with dg.DagsterInstance.get() as instance:
        events = RunEvents(instance, launch)
        killed_step, killed_worker = None, None
        while killed_step is None:
            assert launch.thread.is_alive(), "the run ended before a worker picked up a shard step"
            events.check_not_stuck(setting["root"])
            for entry in events.new():
                worker = _celery_worker(entry)
                if worker is not None and entry.dagster_event.step_key.startswith(SHARD_STEP):
                    killed_step, killed_worker = entry.dagster_event.step_key, worker
                    os.killpg(workers[worker].pid, signal.SIGKILL)
                    break
            time.sleep(0.05)
        workers[killed_worker].wait(timeout=60)
        result = _finished(setting, launch)
        attempts = _worker_of_each_attempt(instance, result.run_id)
        successes = [
            e for e in instance.all_logs(result.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)
            if e.dagster_event.step_key == killed_step
        ]
    survivor = next(n for n in WORKERS if n != killed_worker)
    # a step picked up twice without a kill ran longer than the visibility timeout
    assert attempts[killed_step] == [killed_worker, survivor] and len(successes) == 1, attempts
    assert all(len(names) == 1 for step, names in attempts.items() if step != killed_step), attempts
    _assert_same_outputs(setting["root"], setting["run_id"])


def test_a_run_whose_broker_is_down_fails_at_once_with_a_named_error(setting, tmp_path):
    """Nothing listens on the broker's port: the run fails with CeleryBrokerUnavailable within 15 s of
    starting (the broker probe waits 5 s at most) and is left FAILURE, not STARTED."""
    from tests.conftest import _free_port

    down = f"redis://127.0.0.1:{_free_port()}/0"
    location = tmp_path / "location_with_a_dead_broker.py"
    location.write_text(
        "from z0inf_pipeline import definitions as local\n"
        "from z0inf_pipeline.deployments import celery\n"
        f"defs = celery.celery_definitions(local.defs, celery.celery_settings({down!r}))\n"
    )
    job = ReconstructableRepository.for_file(str(location), "defs", str(tmp_path)).get_reconstructable_job(
        "influence_job"
    )
    result = _ended(setting, _launch(setting, job))
    with dg.DagsterInstance.get() as instance:
        run = instance.get_run_by_id(result.run_id)
        failure = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        start = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.RUN_START)
    assert not result.success and run.status == dg.DagsterRunStatus.FAILURE
    error = failure[0].dagster_event.event_specific_data.error
    assert "CeleryBrokerUnavailable" in error.to_string() and down in error.to_string()
    assert failure[0].timestamp - start[0].timestamp < 15


def test_the_shipped_worker_config_is_the_code_locations(monkeypatch):
    """deployment/celery.yaml, read the way ``dagster-celery worker start -y`` reads it, configures the
    workers exactly as the code location configures the executor that sends them tasks."""
    from dagster_celery.cli import get_validated_config

    from z0inf_pipeline.deployments import celery

    monkeypatch.setenv(celery.BROKER_ENV, "redis://redis.internal:6379/0")
    workers = get_validated_config(str(REPO_ROOT / "deployment" / "celery.yaml"))
    location = celery.celery_settings("redis://redis.internal:6379/0")
    assert {k: workers[k] for k in location} == location


def test_the_celery_code_location_validates(tmp_path):
    from tests.deploy.test_k8s_deployment import _validate

    result = _validate("z0inf_pipeline.deployments.celery", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful for code location z0inf_pipeline.deployments.celery" in result.stdout + result.stderr
