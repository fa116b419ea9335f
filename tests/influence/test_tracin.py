"""The opt-in TracInCP method against brute force: per-example gradients from one autograd backward pass
per example (an independent computation), on models small enough to hold them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.influence.test_directions import (
    NAMES_ALL,
    data,
    exact_gradients,
    loss_table,
    per_example_loss,
    run,  # noqa: F401 (fixture)
    tiny_model,
    tracin,
)
from z0inf_pipeline.errors import InputError
from z0inf_pipeline.influence.analysis import InfluenceAnalysis, InfluenceArguments, TrainTestArguments
from z0inf_pipeline.influence.directions import ForwardAccess
from z0inf_pipeline.influence.tracin import per_example_gradients, tracincp_features


class Branching(nn.Module):
    """A forward with a data-dependent branch, which vmap cannot batch over examples."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 3).double()

    def forward(self, x):
        return self.layer(x) if float(x.sum()) > 0 else -self.layer(x)


@pytest.mark.parametrize("factory, names", [(tiny_model, NAMES_ALL), (tiny_model, ["2.weight"]),
                                            (Branching, ["layer.weight", "layer.bias"])])
def test_per_example_gradients_are_autograd_one_example_at_a_time(factory, names):
    model = factory()
    x, y = data(9, 3)
    got = per_example_gradients(model, names, x, y, per_example_loss, batch_size=4)
    torch.testing.assert_close(got, exact_gradients(model, names, x, y), rtol=1e-10, atol=1e-12)


def test_analysis_tracincp_is_exact_tracin_over_every_checkpoint_learning_rate_weighted(run):  # noqa: F811
    train, test = data(12, 1), data(6, 2)
    access = ForwardAccess(tiny_model, train, test, per_example_loss, dtype=torch.float64)
    tables = [loss_table(tiny_model, run, split, ids) for split, ids in ((train, range(12)), (test, range(6)))]
    analysis = InfluenceAnalysis([c.path for c in run], *tables, InfluenceArguments(),
                                 train_test=TrainTestArguments(method="tracincp"), forward=access)
    assert analysis.train_test_method == ("tracincp", None)
    eta = torch.tensor([c.learning_rate for c in run], dtype=torch.float64)
    expected = tracin(run, NAMES_ALL, train, test, eta).numpy()
    np.testing.assert_allclose(analysis.full_frame().iloc[:, 1:].to_numpy(), expected, rtol=1e-9, atol=1e-12)
    top = analysis.topk_frame()
    first = top[(top["test_example_id"] == 0) & (top["rank"] == 1)]
    assert int(first["proponent_id"].iloc[0]) == int(np.argmax(expected[:, 0]))


def test_tracincp_without_a_model_falls_back_to_the_trajectory_and_says_so(run):  # noqa: F811
    train, test = data(12, 1), data(6, 2)
    tables = [loss_table(tiny_model, run, split, ids) for split, ids in ((train, range(12)), (test, range(6)))]
    analysis = InfluenceAnalysis([c.path for c in run], *tables, InfluenceArguments(),
                                 train_test=TrainTestArguments(method="tracincp"))
    method, fallback = analysis.train_test_method
    assert method == "trajectory" and "instead of tracincp" in fallback


def test_tracincp_refuses_to_hold_too_many_gradients(run, monkeypatch):  # noqa: F811
    monkeypatch.setattr("z0inf_pipeline.influence.tracin.GRADIENT_LIMIT", 100)
    access = ForwardAccess(tiny_model, data(12, 1), data(6, 2), per_example_loss, dtype=torch.float64)
    with pytest.raises(InputError, match="method tracincp: \\(12 \\+ 6 examples\\) x 43 parameters \\+ the 12 x 6 scores"):
        tracincp_features(access, run, NAMES_ALL, None)
