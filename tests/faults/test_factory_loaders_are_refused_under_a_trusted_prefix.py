"""Trusting a broad factory prefix does not trust its loaders: with ``torch`` trusted, a run naming
``torch.hub:load`` (which would fetch and run code with the run's arguments) is refused before any
import; a plain builder under the same prefix still works. Real MLflow store, real ContractLogger run."""

from __future__ import annotations

import pytest

from z0inf_pipeline.tracking import ContractError, fetch_run
from z0inf_pipeline.tracking.config import TRUSTED_FACTORIES_ENV
from z0inf_pipeline.tracking.reader import check_factory_trusted

from .test_untrusted_model_factories_are_refused import log_run


@pytest.mark.parametrize("factory", ["torch.hub:load", "torch.jit:load", "torch:load", "torch.serialization:load",
                                     "torch.hub:load_state_dict_from_url"])
def test_loaders_are_refused_under_a_trusted_broad_prefix(factory, monkeypatch):
    monkeypatch.setenv(TRUSTED_FACTORIES_ENV, "torch")
    with pytest.raises(ContractError, match="loads code or files"):
        check_factory_trusted("r1", {"factory": factory, "kwargs": {}})


def test_a_run_naming_torch_hub_load_is_refused_at_fetch(tracking_uri, monkeypatch):
    monkeypatch.setenv(TRUSTED_FACTORIES_ENV, "torch")
    run_id = log_run(tracking_uri, {"factory": "torch.hub:load", "kwargs": {"repo_or_dir": "evil/repo", "model": "x"}})
    with pytest.raises(ContractError, match="loads code or files"):
        fetch_run(run_id, tracking_uri=tracking_uri)
    check_factory_trusted("r1", {"factory": "torch.nn:Linear", "kwargs": {"in_features": 4, "out_features": 2}})
