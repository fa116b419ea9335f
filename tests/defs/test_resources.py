"""Resources: device selection and a fast, explicit answer when MLflow is down."""

from __future__ import annotations

import socket

import dagster as dg
import pytest
import torch
from mlflow import MlflowClient

from z0inf_pipeline.defs.resources import ComputeResource, DecisionStoreResource, MlflowResource, MlflowUnavailable
from z0inf_pipeline.errors import InputError
from z0inf_pipeline.review import DecisionStore


def test_compute_device_auto_is_cuda_only_when_present():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert ComputeResource().torch_device().type == expected
    assert ComputeResource(device="cpu", dtype="float64").torch_dtype() is torch.float64


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_it_names_the_device():
    with pytest.raises(InputError, match="'cuda:1' asked for, but CUDA is not available"):
        ComputeResource(device="cuda:1").torch_device()


def test_bad_compute_settings_are_refused():
    with pytest.raises(InputError, match="not a torch device"):
        ComputeResource(device="tpu-ish").torch_device()
    with pytest.raises(Exception, match="greater than 0"):
        ComputeResource(batch_size=0)


def test_unreachable_server_is_reported_as_unavailable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    resource = MlflowResource(tracking_uri=f"http://127.0.0.1:{port}", probe_timeout_s=2)
    with pytest.raises(MlflowUnavailable, match=f"MLflow at http://127.0.0.1:{port} is unreachable"):
        resource.contract_runs()  # the /health probe answers at once; MLflow's client would retry for minutes


def test_decision_store_resource_opens_the_configured_file_or_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("Z0INF_DATA_DIR", str(tmp_path / "data"))
    assert DecisionStoreResource().open().path == tmp_path / "data" / "review.db"
    chosen = tmp_path / "team" / "decisions.db"
    store = DecisionStoreResource(url=str(chosen)).open()
    store.record("abc123", [7], "drop", reviewer="test")
    assert chosen.exists() and DecisionStore.open(chosen).current("abc123")["example_id"].tolist() == [7]


def test_the_analysed_run_is_fetched_once_and_named_in_links(tracking_uri):
    from z0inf_pipeline.tracking import train_and_log
    from z0inf_pipeline.training import TrainConfig

    run_id = train_and_log(TrainConfig(epochs=1, checkpoints=2, hidden=(4,)), tracking_uri=tracking_uri)
    resource = MlflowResource()
    assert resource.fetch(run_id) is resource.fetch(run_id)
    name = MlflowClient(tracking_uri).get_run(run_id).info.run_name
    metadata = resource.run_metadata(run_id)
    assert metadata["mlflow_run_id"].value == run_id and metadata["mlflow_run_name"].value == name
    experiment = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    assert metadata["mlflow_run"].value == (
        f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"
    )
    assert "make mlflow-ui" in metadata["mlflow_run_ui"].value


@pytest.mark.mlflow_server
def test_a_run_on_a_tracking_server_is_linked_by_url(mlflow_server, tmp_path, monkeypatch):
    from z0inf_pipeline.tracking import train_and_log
    from z0inf_pipeline.training import TrainConfig

    monkeypatch.setenv("Z0INF_DATA_DIR", str(tmp_path / "data"))
    run_id = train_and_log(TrainConfig(epochs=1, checkpoints=2, hidden=(4,)), tracking_uri=mlflow_server)
    experiment = MlflowClient(mlflow_server).get_run(run_id).info.experiment_id
    link = MlflowResource(tracking_uri=mlflow_server).run_metadata(run_id)["mlflow_run"]
    assert isinstance(link, dg.UrlMetadataValue)
    assert link.value == f"{mlflow_server}/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"
