"""Ground-truth mechanics on a small synthetic problem trained for real (batched logistic regressions).

R regularised logistic regressions are trained at once, one per random subset (the subset is a
0/1 weight on each example's loss), so SSRT with dozens of models takes well under a second.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from z0inf_pipeline.evaluation import (
    columnwise_spearman,
    detection_scores,
    linear_datamodeling_score,
    random_subsets,
    spearman,
    ssrt_self_influence,
    ssrt_train_test_influence,
)
from z0inf_pipeline.errors import InputError

NUM_ATYPICAL = 4


def _blobs(n_per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    centers = np.array([[-1.5, 0.0], [1.5, 0.0]])
    y = np.repeat([0, 1], n_per_class)
    x = centers[y] + rng.normal(size=(2 * n_per_class, 2))
    return x, y


@pytest.fixture(scope="module")
def problem():
    """80 typical training points, then 4 atypical ones: deep inside class 0 but labelled 1."""
    rng = np.random.default_rng(0)
    x_typ, y_typ = _blobs(40, rng)
    x_odd = np.array([[-3.0, 0.5], [-3.2, -0.4], [-2.8, 1.0], [-3.5, 0.0]])
    x_train = np.vstack([x_typ, x_odd])
    y_train = np.concatenate([y_typ, np.ones(NUM_ATYPICAL, dtype=int)])
    x_test, y_test = _blobs(20, rng)
    return x_train, y_train, x_test, y_test


def _train_on_subsets(problem, masks: np.ndarray, steps: int = 400, lr: float = 1.0, weight_decay: float = 1e-2):
    """Full-batch gradient descent on R logistic regressions at once; returns (R, N) train and (R, M) test losses."""
    x_train, y_train, x_test, y_test = problem
    add_bias = lambda x: torch.cat([torch.as_tensor(x, dtype=torch.float64), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    xtr, xte = add_bias(x_train), add_bias(x_test)
    ytr, yte = torch.as_tensor(y_train), torch.as_tensor(y_test)
    weight = torch.as_tensor(masks, dtype=torch.float64)
    weight = weight / weight.sum(dim=1, keepdim=True)
    w = torch.zeros(len(masks), xtr.shape[1], 2, dtype=torch.float64, requires_grad=True)

    def losses(x, y):
        logits = x @ w  # (R, n, 2)
        return torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), y.expand(len(masks), -1), reduction="none")

    opt = torch.optim.SGD([w], lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra intra-op threads only add overhead (50x on a busy box)
    try:
        for _ in range(steps):
            opt.zero_grad()
            objective = (weight * losses(xtr, ytr)).sum() + weight_decay * (w**2).sum() / 2
            objective.backward()
            opt.step()
        with torch.no_grad():
            return losses(xtr, ytr).numpy(), losses(xte, yte).numpy()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ssrt(problem):
    masks = random_subsets(len(problem[1]), 64, fraction=0.5, seed=1)
    train_losses, test_losses = _train_on_subsets(problem, masks)
    return masks, train_losses, test_losses


@pytest.fixture(scope="module")
def holdout(problem):
    masks = random_subsets(len(problem[1]), 48, fraction=0.5, seed=2)
    return masks, _train_on_subsets(problem, masks)[1]


def test_ssrt_self_influence_ranks_atypical_examples_highest(ssrt):
    masks, train_losses, _ = ssrt
    scores = ssrt_self_influence(masks, train_losses)
    top = set(np.argsort(-scores)[:NUM_ATYPICAL].tolist())
    atypical = set(range(len(scores) - NUM_ATYPICAL, len(scores)))
    assert top == atypical
    assert detection_scores(scores, np.isin(np.arange(len(scores)), list(atypical))).auroc == 1.0


def test_lds_of_random_scores_is_near_zero(ssrt, holdout):
    masks, _, test_losses = ssrt
    rng = np.random.default_rng(3)
    values = [
        linear_datamodeling_score(rng.normal(size=(masks.shape[1], test_losses.shape[1])), *holdout).mean
        for _ in range(5)
    ]
    assert abs(np.mean(values)) < 0.08


def test_lds_of_ssrt_estimates_on_held_out_subsets_is_clearly_positive(ssrt, holdout):
    masks, _, test_losses = ssrt
    estimates = ssrt_train_test_influence(masks, test_losses)
    lds = linear_datamodeling_score(estimates, *holdout)
    assert lds.mean > 0.4
    assert lds.mean - 3 * lds.stderr > 0
    # Sign alignment: the opposite attribution must score the opposite way.
    assert linear_datamodeling_score(-estimates, *holdout).mean == pytest.approx(-lds.mean)


def test_ssrt_estimates_match_a_direct_loop():
    rng = np.random.default_rng(4)
    masks = random_subsets(7, 12, seed=5)
    masks[0], masks[1] = True, False  # every example is in and out at least once
    train_losses, test_losses = rng.random((12, 7)), rng.random((12, 3))
    expected_self = [train_losses[~masks[:, i], i].mean() - train_losses[masks[:, i], i].mean() for i in range(7)]
    expected_pair = [
        [test_losses[~masks[:, i], z].mean() - test_losses[masks[:, i], z].mean() for z in range(3)] for i in range(7)
    ]
    np.testing.assert_allclose(ssrt_self_influence(masks, train_losses), expected_self, rtol=1e-12)
    np.testing.assert_allclose(ssrt_train_test_influence(masks, test_losses), expected_pair, rtol=1e-12)


def test_lds_matches_a_direct_computation():
    rng = np.random.default_rng(6)
    scores, masks, losses = rng.normal(size=(9, 4)), rng.random((15, 9)) < 0.5, rng.random((15, 4))
    expected = [spearmanr(-(masks.astype(float) @ scores[:, z]), losses[:, z]).statistic for z in range(4)]
    result = linear_datamodeling_score(scores, masks, losses)
    np.testing.assert_allclose(result.per_example, expected, rtol=1e-12)
    assert result.mean == pytest.approx(np.mean(expected))


def test_spearman_handles_ties_like_scipy():
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 4, size=(30, 5)), rng.integers(0, 3, size=(30, 5))
    expected = [spearmanr(a[:, c], b[:, c]).statistic for c in range(5)]
    np.testing.assert_allclose(columnwise_spearman(a, b), expected, rtol=1e-12)
    assert spearman(a[:, 0], b[:, 0]) == pytest.approx(expected[0])
    assert np.isnan(columnwise_spearman(np.ones((4, 1)), np.arange(4.0)[:, None])[0])


def test_detection_scores_against_known_orderings():
    positives = np.array([False, False, True, False, True])
    perfect = detection_scores([0.1, 0.2, 0.9, 0.3, 0.8], positives)
    assert (perfect.auprc, perfect.auroc, perfect.base_rate) == (1.0, 1.0, 0.4)
    # Positives ranked 1st and 3rd of 5: precision 1 at the first, 2/3 at the second.
    mixed = detection_scores([0.1, 0.8, 0.9, 0.3, 0.5], positives)
    assert mixed.auprc == pytest.approx((1 + 2 / 3) / 2)
    assert mixed.auroc == pytest.approx(5 / 6)


def test_bad_inputs_are_named():
    masks = np.ones((4, 3), dtype=bool)
    with pytest.raises(InputError, match="never outside"):
        ssrt_self_influence(masks, np.zeros((4, 3)))
    good = random_subsets(3, 40, seed=0)
    with pytest.raises(InputError, match="train_losses: expected shape"):
        ssrt_self_influence(good, np.zeros((40, 4)))
    with pytest.raises(InputError, match="boolean"):
        detection_scores([1.0, 2.0], [0, 1])
    with pytest.raises(InputError, match="scores: expected"):
        linear_datamodeling_score(np.zeros((2, 2)), good, np.zeros((40, 2)))
