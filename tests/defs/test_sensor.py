"""The sensor on new MLflow runs: each FINISHED contract run is requested exactly once, and an
unreachable MLflow is a skipped tick that loses nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import dagster as dg
import pytest
import requests
from mlflow import MlflowClient

from z0inf_pipeline.definitions import defs
from z0inf_pipeline.defs.resources import MlflowResource
from z0inf_pipeline.defs.sensors import new_mlflow_runs
from z0inf_pipeline.tracking import CONTRACT_TAG, CONTRACT_VERSION

from ..conftest import SERVER_START_TIMEOUT_S


def tick(instance, uri: str, cursor: str | None):
    """One sensor evaluation as the daemon does it; requested partitions are added as the daemon would."""
    with dg.build_sensor_context(
        instance=instance,
        instance_ref=instance.get_ref(),
        cursor=cursor,
        definitions=defs,
        resources={"mlflow": MlflowResource(tracking_uri=uri)},
    ) as context:
        data = new_mlflow_runs.evaluate_tick(context)
    for request in data.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return data


def test_requests_exactly_the_finished_contract_run_once(instance, contract_run, tracking_uri):
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("z0inf").experiment_id
    plain = client.create_run(experiment, run_name="not-a-contract-run").info.run_id
    client.set_terminated(plain, "FINISHED")
    client.create_run(experiment, tags={CONTRACT_TAG: CONTRACT_VERSION})  # still RUNNING: not yet

    first = tick(instance, tracking_uri, None)
    assert [(r.run_key, r.partition_key) for r in first.run_requests] == [(contract_run, contract_run)]
    assert first.run_requests[0].job_name in (None, "influence_job")
    assert instance.get_dynamic_partitions("mlflow_runs") == [contract_run]

    second = tick(instance, tracking_uri, first.cursor)
    assert second.run_requests == []
    assert "no new" in second.skip_message


def test_runs_registered_elsewhere_are_remembered_not_requested(instance, contract_run, tracking_uri):
    instance.add_dynamic_partitions("mlflow_runs", [contract_run])  # e.g. `z0inf demo` materialised it already
    data = tick(instance, tracking_uri, None)
    assert data.run_requests == [] and contract_run in data.cursor


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.mlflow_server
def test_skips_while_mlflow_is_down_and_requests_the_run_once_it_is_back(
    instance, contract_run, tracking_uri, tmp_path
):
    port = _free_port()
    server_uri = f"http://127.0.0.1:{port}"

    down = tick(instance, server_uri, None)
    assert down.run_requests == []
    assert "unreachable" in down.skip_message and down.cursor is None

    # Bring MLflow up on that port, serving the store that holds the contract run.
    log = (tmp_path / "mlflow-server.log").open("wb")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            tracking_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S  # a hang guard: the wait ends on health or exit
        while True:
            assert server.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-3000:]
            try:
                if requests.get(f"{server_uri}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
        up = tick(instance, server_uri, down.cursor)
        assert [r.run_key for r in up.run_requests] == [contract_run]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()

    # Down again: skipped, and the cursor that remembers the run is kept as it was.
    again = tick(instance, server_uri, up.cursor)
    assert again.run_requests == [] and "unreachable" in again.skip_message
    assert again.cursor in (None, up.cursor)


def test_a_run_trained_by_train_job_is_picked_up(instance, tracking_uri):
    config = {"epochs": 2, "checkpoints": 3, "hidden": [8], "label_noise": 0.05}
    result = defs.resolve_job_def("train_job").execute_in_process(
        instance=instance, run_config={"ops": {"train_contract_run": {"config": config}}}
    )
    run_id = result.output_for_node("train_contract_run")
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[CONTRACT_TAG] == CONTRACT_VERSION
    assert run.data.params["label_noise"] == "0.05" and run.data.params["epochs"] == "2"
    assert [r.run_key for r in tick(instance, tracking_uri, None).run_requests] == [run_id]
