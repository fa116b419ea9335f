"""Resources: device selection and a fast, explicit answer when MLflow is down."""

from __future__ import annotations

import socket

import pytest
import torch

from z0inf_pipeline.defs.resources import ComputeResource, MlflowResource, MlflowUnavailable
from z0inf_pipeline.influence.errors import InfluenceInputError


def test_compute_device_auto_is_cuda_only_when_present():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert ComputeResource().torch_device().type == expected
    assert ComputeResource(device="cpu", dtype="float64").torch_dtype() is torch.float64


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_it_names_the_device():
    with pytest.raises(InfluenceInputError, match="'cuda:1' asked for, but CUDA is not available"):
        ComputeResource(device="cuda:1").torch_device()


def test_bad_compute_settings_are_refused():
    with pytest.raises(InfluenceInputError, match="not a torch device"):
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
