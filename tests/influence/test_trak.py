"""The opt-in TRAK method against TRAK's formula computed directly: margin gradients by autograd one example
at a time, projected with the same matrix (traker's projector applied to the identity, divided by sqrt(D) as
traker normalises its features), then in numpy the
(Phi^T Phi)^-1 kernel (scaled by its mean |entry|, as traker does), the average over checkpoints and the
(1 - p) reweighting. Float32 is traker's storage, hence the tolerance
(the difference measured is 6e-7 of the largest score)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trak.projectors import BasicProjector, ProjectionType

from tests.influence.test_directions import (
    NAMES_ALL,
    data,
    loss_table,
    per_example_loss,
    run,  # noqa: F401 (fixture)
    tiny_model,
)
from z0inf_pipeline.errors import InputError
from z0inf_pipeline.influence.analysis import InfluenceAnalysis, InfluenceArguments, TrainTestArguments
from z0inf_pipeline.influence.checkpoints import load_state_dict
from z0inf_pipeline.influence.directions import ForwardAccess
from z0inf_pipeline.influence.trak import trak_checkpoint_positions, trak_features
from z0inf_pipeline.training.reevaluate import refuse_unfit_method

N, M, K = 40, 6, 8


def margin_gradients(model, inputs, targets) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) gradients of logit_y - logsumexp of the other logits, one backward pass per example, and
    each example's softmax probability of its label."""
    params = [p for _, p in model.named_parameters()]
    rows, probabilities = [], []
    for x, y in zip(inputs, targets):
        logits = model(x[None])[0]
        others = torch.cat([logits[:y], logits[y + 1 :]])
        margin = logits[y] - torch.logsumexp(others, 0)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(margin, params)]).numpy())
        probabilities.append(float(torch.softmax(logits.detach(), 0)[y]))
    return np.stack(rows), np.array(probabilities)


def trak_by_formula(checkpoints, train, test, seed=0) -> np.ndarray:
    model = tiny_model()
    dim = sum(p.numel() for p in model.parameters())
    projector = BasicProjector(grad_dim=dim, proj_dim=K, seed=seed, device="cpu",
                               proj_type=ProjectionType.rademacher, dtype=torch.float32)
    kernel_sum, weight_sum = np.zeros((N, M)), np.zeros(N)
    for model_id, checkpoint in enumerate(checkpoints):
        model.load_state_dict(load_state_dict(checkpoint))
        projection = projector.project(torch.eye(dim), model_id=model_id).double().numpy() / np.sqrt(dim)  # (D, K)
        g_train, p_train = margin_gradients(model, *train)
        g_test, _ = margin_gradients(model, *test)
        phi, phi_test = g_train @ projection, g_test @ projection
        inverse = np.linalg.inv(phi.T @ phi)
        kernel_sum += phi @ (inverse / np.abs(inverse).mean()) @ phi_test.T
        weight_sum += 1 - p_train
    return kernel_sum / len(checkpoints) * (weight_sum / len(checkpoints))[:, None]


def test_checkpoints_used_are_spread_over_the_second_half_always_the_last():
    assert trak_checkpoint_positions(4, 9) == [4, 5, 7, 8]
    assert trak_checkpoint_positions(1, 9) == [8]
    assert trak_checkpoint_positions(3, 3) == [1, 2]


def test_analysis_trak_is_the_trak_formula_at_the_late_checkpoints(run):  # noqa: F811
    train, test = data(N, 1), data(M, 2)
    access = ForwardAccess(tiny_model, train, test, per_example_loss, dtype=torch.float64)
    tables = [loss_table(tiny_model, run, split, ids) for split, ids in ((train, range(N)), (test, range(M)))]
    analysis = InfluenceAnalysis([c.path for c in run], *tables, InfluenceArguments(), forward=access,
                                 train_test=TrainTestArguments(method="trak", trak_projection_dim=K, trak_checkpoints=3))
    assert analysis.train_test_method == ("trak", None)
    expected = trak_by_formula(run[1:], train, test)  # 3 checkpoints, 3 asked: positions 1 and 2
    got = analysis.full_frame().iloc[:, 1:].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    top = analysis.topk_frame()
    first = top[(top["test_example_id"] == 0) & (top["rank"] == 1)]
    assert int(first["proponent_id"].iloc[0]) == int(np.argmax(expected[:, 0]))


def test_trak_without_a_model_falls_back_to_the_trajectory_and_says_so(run):  # noqa: F811
    tables = [loss_table(tiny_model, run, split, ids) for split, ids in ((data(12, 1), range(12)), (data(6, 2), range(6)))]
    analysis = InfluenceAnalysis([c.path for c in run], *tables, InfluenceArguments(),
                                 train_test=TrainTestArguments(method="trak"))
    method, fallback = analysis.train_test_method
    assert method == "trajectory" and "instead of trak" in fallback


def test_trak_refuses_a_text_run_by_name(run):  # noqa: F811
    """Token-sequence targets (a causal LM's): traker's classification margin does not apply."""
    tokens = torch.randint(0, 3, (N, 5))
    access = ForwardAccess(tiny_model, (data(N, 1)[0], tokens), (data(M, 2)[0], tokens[:M]), per_example_loss)
    with pytest.raises(InputError, match=r"method trak: the train data \(targets of shape \(40, 5\).*text"):
        trak_features(access, run, NAMES_ALL, projection_dim=K)


def test_trak_refuses_a_projection_wider_than_the_training_set(run):  # noqa: F811
    access = ForwardAccess(tiny_model, data(N, 1), data(M, 2), per_example_loss, dtype=torch.float64)
    with pytest.raises(InputError, match="trak_projection_dim=41: above the 40 training examples"):
        trak_features(access, run, NAMES_ALL, projection_dim=41)


def test_a_text_run_asked_for_trak_is_refused_before_its_missing_data_falls_back():
    """The LM recipe's data is not rebuilt by the pipeline: without this refusal, trak would quietly become
    the trajectory. The CLI's --run and the train_test_influence asset both call it."""
    with pytest.raises(InputError, match="method trak: run abc is a text \\(language-model\\) run"):
        refuse_unfit_method("abc", {"recipe": "lm"}, "trak")
    refuse_unfit_method("abc", {"recipe": "lm"}, "tracincp")
    refuse_unfit_method("abc", {"dataset": "iris"}, "trak")
    refuse_unfit_method("abc", None, "trak")
