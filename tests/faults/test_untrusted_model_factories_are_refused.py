"""A run's model spec may only name a factory from a trusted module (default: none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from z0inf_pipeline.errors import ConfigurationError
from z0inf_pipeline.tracking import ContractError, ContractLogger, fetch_run
from z0inf_pipeline.tracking.config import TRUSTED_FACTORIES_ENV, trusted_factory_prefixes


def make_net(width: int = 8) -> torch.nn.Module:
    """A factory a team would trust (this test module)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))


def log_run(tracking_uri: str, spec: dict) -> str:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 4, generator=gen), torch.randint(0, 2, (24,), generator=gen)
    model = make_net()
    with ContractLogger(model_spec=spec, train=(np.arange(16), x[:16], y[:16]), test=(np.arange(16, 24), x[16:], y[16:]),
                        tracking_uri=tracking_uri, expected_checkpoints=3) as run:
        for step in range(3):
            run.on_checkpoint(model, step, epoch=step, lr=0.1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01)
    return run.run_id


def test_os_system_is_refused_at_fetch_nothing_runs_nothing_is_cached(tracking_uri, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    run_id = log_run(tracking_uri, {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}})
    cache = tmp_path / "cache"
    monkeypatch.delenv(TRUSTED_FACTORIES_ENV, raising=False)
    with pytest.raises(ContractError, match=rf"run {run_id}: model spec factory 'os:system' is not in a trusted module"):
        fetch_run(run_id, tracking_uri=tracking_uri, cache_dir=cache)
    assert not marker.exists()
    assert list(cache.iterdir()) == []  # no entry, no partial download

    # trusting one package does not trust another whose name merely starts the same way
    monkeypatch.setenv(TRUSTED_FACTORIES_ENV, "o, tests.faults")
    with pytest.raises(ContractError, match="'os:system' is not in a trusted module"):
        fetch_run(run_id, tracking_uri=tracking_uri, cache_dir=cache)
    assert not marker.exists() and list(cache.iterdir()) == []


def test_a_trusted_factory_is_fetched_and_rebuilt_and_refused_once_distrusted(tracking_uri, tmp_path, monkeypatch):
    spec = {"factory": f"{__name__}:make_net", "kwargs": {"width": 8}}
    run_id = log_run(tracking_uri, spec)
    monkeypatch.setenv(TRUSTED_FACTORIES_ENV, "tests.faults")
    run = fetch_run(run_id, tracking_uri=tracking_uri, cache_dir=tmp_path / "cache")
    model = run.load_model()
    assert isinstance(model, torch.nn.Sequential) and model[0].out_features == 8
    # the cached entry is checked again: narrowing the list refuses it
    monkeypatch.setenv(TRUSTED_FACTORIES_ENV, "my_team.models")
    with pytest.raises(ContractError, match="make_net' is not in a trusted module"):
        fetch_run(run_id, tracking_uri=tracking_uri, cache_dir=tmp_path / "cache")
    with pytest.raises(ContractError, match="not in a trusted module"):
        run.load_model()


def test_the_allow_list_must_hold_module_names(monkeypatch):
    monkeypatch.setenv(TRUSTED_FACTORIES_ENV, "my_team.models, ../evil")
    with pytest.raises(ConfigurationError, match=r"\$Z0INF_TRUSTED_FACTORIES: \['../evil'\] are not module names"):
        trusted_factory_prefixes()
    monkeypatch.setenv(TRUSTED_FACTORIES_ENV, "")
    assert trusted_factory_prefixes() == ()
