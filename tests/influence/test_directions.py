"""Random-direction train-test influence against brute force: exact per-example gradients by autograd,
one example at a time (an independent computation), on a model small enough to hold them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from z0inf_pipeline.errors import InputError
from z0inf_pipeline.influence import LossTable, load_state_dict, save_checkpoint, train_test_influence
from z0inf_pipeline.influence.analysis import InfluenceAnalysis, InfluenceArguments, TrainTestArguments
from z0inf_pipeline.influence.checkpoints import open_checkpoints
from z0inf_pipeline.influence.directions import (
    FiniteDifferenceRoundingWarning,
    ForwardAccess,
    direction,
    direction_checkpoint_positions,
    direction_features,
    direction_projections,
    PrefixReuseWarning,
    frozen_prefix,
)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def per_example_loss(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def data(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def exact_gradients(model: nn.Module, names, inputs, targets) -> torch.Tensor:
    """(n, D) per-example gradients over ``names``, one backward pass per example."""
    params = dict(model.named_parameters())
    rows = []
    for x, y in zip(inputs, targets):
        loss = per_example_loss(model(x[None]), y[None]).sum()
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


NAMES_ALL = ["0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("names", [NAMES_ALL, ["2.weight", "2.bias"]])
def test_each_projection_is_the_gradient_along_its_direction(distribution, names):
    """s_{i,p} = <grad l_i, u_p> up to the O(eps^2) of a central difference (float64)."""
    model = tiny_model()
    train = data(7, 1)
    (s,) = direction_projections(model, names, [train], per_example_loss, directions=5, step_size=1e-4,
                                 seed=3, step=10, distribution=distribution)
    grads = exact_gradients(model, names, *train)
    shapes = {n: dict(model.named_parameters())[n].shape for n in names}
    u = torch.stack([torch.cat([t.reshape(-1).double() for t in direction(shapes, 3, 10, p, distribution).values()])
                     for p in range(5)])
    torch.testing.assert_close(s, grads @ u.T, rtol=1e-6, atol=1e-8)


def test_directions_are_regenerated_not_stored_and_differ_by_step_and_index():
    shapes = {"a": torch.Size([3, 4]), "b": torch.Size([2])}
    first, again = direction(shapes, 0, 5, 1), direction(shapes, 0, 5, 1)
    assert all(torch.equal(first[n], again[n]) for n in shapes)
    assert set(torch.cat([t.reshape(-1) for t in first.values()]).tolist()) <= {-1, 1}
    assert not torch.equal(first["a"], direction(shapes, 0, 6, 1)["a"])
    assert not torch.equal(first["a"], direction(shapes, 0, 5, 2)["a"])


def test_weights_are_restored_exactly():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    direction_projections(model, NAMES_ALL, [data(5, 1)], per_example_loss, directions=3, step_size=1e-2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.fixture
def run(tmp_path):
    """Three checkpoints of the tiny model, with learning rates as step weights."""
    folder = tmp_path / "ckpts"
    model = tiny_model()
    gen = torch.Generator().manual_seed(5)
    for t in range(3):
        state = {k: v + 0.3 * t * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in model.state_dict().items()}
        save_checkpoint(folder / f"ckpt-{t}.safetensors", state, step=10 * t, learning_rate=0.1 / (t + 1))
    return open_checkpoints(folder)


def tracin(checkpoints, names, train, test, eta) -> torch.Tensor:
    total = 0
    for t, c in enumerate(checkpoints):
        model = tiny_model()
        model.load_state_dict({k: v.double() for k, v in load_state_dict(c).items()})
        total = total + eta[t] * exact_gradients(model, names, *train) @ exact_gradients(model, names, *test).T
    return total


def test_estimate_converges_to_tracin_inner_products_as_directions_grow(run):
    """Error of sum_t eta_t (1/P) S_tr S_te^T against exact TracInCP falls like 1/sqrt(P)."""
    train, test = data(12, 1), data(6, 2)
    eta = torch.tensor([c.learning_rate for c in run], dtype=torch.float64)
    exact = tracin(run, NAMES_ALL, train, test, eta)
    access = ForwardAccess(tiny_model, train, test, per_example_loss, dtype=torch.float64, directions_per_pass=256)
    errors = {}
    for P in (16, 256, 4096):
        a, b = direction_features(access, run, NAMES_ALL, eta, directions=P, step_size=1e-4, seed=1)
        errors[P] = float((a @ b.T - exact).norm() / exact.norm())
    assert errors[4096] < 0.1
    assert errors[16] > errors[256] > errors[4096]
    assert errors[256] / errors[4096] > 2.0  # 1/sqrt(P): a factor 4 expected
    a, b = direction_features(access, run, NAMES_ALL, eta, directions=4096, step_size=1e-4, seed=1)
    assert np.corrcoef((a @ b.T).reshape(-1), exact.reshape(-1))[0, 1] > 0.99


def test_float32_step_too_small_is_announced():
    model = tiny_model().float()
    x, y = data(20, 1)
    with pytest.warns(FiniteDifferenceRoundingWarning, match="step_size"):
        direction_projections(model, NAMES_ALL, [(x.float(), y)], per_example_loss, directions=2, step_size=1e-9)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"directions": 0}, "directions=0"), ({"step_size": 0.0}, "step_size=0.0"),
     ({"distribution": "uniform"}, "distribution"), ({"names": ["nope"]}, "nope")],
)
def test_bad_settings_get_a_named_error(kwargs, message):
    settings = {"directions": 2, "step_size": 1e-3, "names": NAMES_ALL, **kwargs}
    names = settings.pop("names")
    with pytest.raises(InputError, match=message):
        direction_projections(tiny_model(), names, [data(3, 1)], per_example_loss, **settings)


@pytest.mark.parametrize("window, count, expected", [(np.arange(2, 20), 4, [6, 11, 15, 19]),
                                                     (np.arange(5), 9, [0, 1, 2, 3, 4]), (np.arange(6), 1, [5])])
def test_direction_checkpoints_spread_over_the_window_ending_at_the_last(window, count, expected):
    assert direction_checkpoint_positions(window, count).tolist() == expected


def loss_table(model_factory, checkpoints, split, ids):
    """Loss tables computed directly (autograd-free forward passes, one checkpoint at a time)."""
    rows = []
    for c in checkpoints:
        model = model_factory()
        model.load_state_dict({k: v.double() for k, v in load_state_dict(c).items()})
        with torch.no_grad():
            rows.append(per_example_loss(model(split[0]), split[1]))
    return LossTable(np.asarray(ids), tuple(c.step for c in checkpoints), torch.stack(rows).float())


def test_analysis_full_matrix_converges_to_tracin_over_the_chosen_checkpoints(run):
    """Through InfluenceAnalysis: rows follow the loss table's ids, the window's last checkpoints are
    perturbed, and at P = 4096 the matrix is TracInCP's over those checkpoints (eta = learning rate)."""
    train, test = data(12, 1), data(6, 2)
    access = ForwardAccess(tiny_model, train, test, per_example_loss, dtype=torch.float64, directions_per_pass=256)
    tables = [loss_table(tiny_model, run, split, ids) for split, ids in ((train, range(100, 112)), (test, range(6)))]
    settings = TrainTestArguments(warmup_fraction=0.0, directions=4096, direction_checkpoints=2, step_size=1e-4,
                                  eta="learning_rate")
    analysis = InfluenceAnalysis([c.path for c in run], *tables, InfluenceArguments(),
                                 train_test=settings, forward=access)
    assert analysis.train_test_method == ("directions", None)
    frame = analysis.full_frame()
    assert frame["example_id"].tolist() == list(range(100, 112)) and list(frame.columns[1:]) == [str(i) for i in range(6)]
    eta = torch.tensor([c.learning_rate for c in run[1:]], dtype=torch.float64)
    exact = tracin(run[1:], NAMES_ALL, train, test, eta).numpy()
    estimate = frame.iloc[:, 1:].to_numpy()
    assert np.linalg.norm(estimate - exact) / np.linalg.norm(exact) < 0.1


def test_without_a_model_the_trajectory_answers_and_says_so(run):
    train, test = data(12, 1), data(6, 2)
    tables = [loss_table(tiny_model, run, split, ids) for split, ids in ((train, range(12)), (test, range(6)))]
    analysis = InfluenceAnalysis([c.path for c in run], *tables, InfluenceArguments(),
                                 train_test=TrainTestArguments(warmup_fraction=0.0, neighbors=1, neighbor_rule="distance"))
    method, fallback = analysis.train_test_method
    assert method == "trajectory" and "no model factory" in fallback
    expected = train_test_influence(analysis.gram, tables[0].values, tables[1].values, 1, neighbor_rule="distance")
    np.testing.assert_allclose(analysis.full_frame().iloc[:, 1:].to_numpy(), expected.numpy(), rtol=1e-6)


def test_train_test_settings_are_checked_by_name():
    for settings, message in (({"directions": 0}, "directions=0"), ({"warmup_fraction": 1.0}, "warmup_fraction=1.0"),
                              ({"method": "tracin"}, "method='tracin'"), ({"step_size": -1.0}, "step_size=-1.0")):
        with pytest.raises(InputError, match=message):
            TrainTestArguments(**settings)


@pytest.mark.parametrize("names", [["2.weight", "2.bias"], ["2.bias"], NAMES_ALL])
def test_reusing_the_prefix_gives_the_whole_model_numbers(names):
    """With the prefix before the first perturbed module run once per batch, every s_{i,p} equals the
    slow path's (the whole model per direction), over several batches and both datasets."""
    model = tiny_model()
    datasets = [data(11, 1), data(5, 2)]
    settings = dict(directions=6, step_size=1e-4, seed=2, step=3, batch_size=4, directions_per_pass=4)
    fast = direction_projections(model, names, datasets, per_example_loss, **settings)
    slow = direction_projections(model, names, datasets, per_example_loss, reuse_prefix=False, **settings)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_the_prefix_is_the_modules_before_the_first_perturbed_one():
    model = tiny_model()
    x = data(2, 1)[0]
    assert frozen_prefix(model, ["2.weight"], x) == [model[0], model[1]]
    assert frozen_prefix(model, ["0.bias", "2.weight"], x) == []


class EarlyUse(nn.Module):
    """``late``'s weight is also used by the parent before ``early`` runs: ``early`` finishes before ``late``
    starts, yet depends on ``late.weight``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.early, self.late = nn.Linear(4, 4).double(), nn.Linear(4, 3).double()

    def forward(self, x):
        return self.late(torch.tanh(self.early(x + self.late.weight.sum())))


def test_a_prefix_that_depends_on_a_perturbed_parameter_is_caught_and_not_reused():
    model = EarlyUse()
    datasets = [data(6, 1)]
    settings = dict(directions=3, step_size=1e-4, seed=0)
    assert frozen_prefix(model, ["late.weight"], datasets[0][0][:2]) == [model.early]
    with pytest.warns(PrefixReuseWarning, match="whole model"):
        fast = direction_projections(model, ["late.weight"], datasets, per_example_loss, **settings)
    slow = direction_projections(model, ["late.weight"], datasets, per_example_loss, reuse_prefix=False, **settings)
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-9, atol=1e-12)


class ReusedFirstWeight(nn.Module):
    """``head`` holds the first layer's weight (tied, as GPT-2's lm_head holds wte): perturbing it through
    the name ``head.weight`` changes ``embed`` too, which runs first."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Linear(4, 4, bias=False).double(), nn.Linear(4, 4, bias=False).double()
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)))[:, :3]


def test_tied_weights_are_perturbed_everywhere_they_are_used():
    model = ReusedFirstWeight()
    (name,) = [n for n, _ in model.named_parameters()]
    datasets = [data(6, 1)]
    assert frozen_prefix(model, [name], datasets[0][0][:2]) == []
    (s,) = direction_projections(model, [name], datasets, per_example_loss, directions=4, step_size=1e-4)
    grads = exact_gradients(model, [name], *datasets[0])
    u = torch.stack([direction({name: model.embed.weight.shape}, 0, 0, p)[name].reshape(-1).double() for p in range(4)])
    torch.testing.assert_close(s, grads @ u.T, rtol=1e-6, atol=1e-8)


def column_standardised(matrix: np.ndarray) -> np.ndarray:
    return matrix / matrix.std(axis=0, keepdims=True)


def test_trajectory_weight_adds_the_two_estimators_each_standardised_per_test_example(run):
    """The combined matrix equals, computed densely, directions / std + w trajectory / std per column,
    from the two methods' own full matrices."""
    train, test = data(12, 1), data(6, 2)
    access = ForwardAccess(tiny_model, train, test, per_example_loss, dtype=torch.float64, directions_per_pass=256)
    tables = [loss_table(tiny_model, run, split, ids) for split, ids in ((train, range(12)), (test, range(6)))]

    def full(**settings):
        tt = TrainTestArguments(warmup_fraction=0.0, neighbors=1, directions=64, step_size=1e-4, **settings)
        analysis = InfluenceAnalysis([c.path for c in run], *tables, InfluenceArguments(), train_test=tt, forward=access)
        return analysis.full_frame().iloc[:, 1:].to_numpy()

    directions, trajectory = full(), full(method="trajectory")
    combined = full(trajectory_weight=2.5)
    np.testing.assert_allclose(combined, column_standardised(directions) + 2.5 * column_standardised(trajectory),
                               rtol=1e-5, atol=1e-6)  # the trajectory term comes from float32 loss tables
