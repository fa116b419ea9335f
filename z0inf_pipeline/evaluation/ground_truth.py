"""Subsample-and-retrain (SSRT) ground truth and the linear datamodeling score (LDS).

Definitions (../shared/z0inf-method.md): R models are trained on random subsets S_r that
hold each training example with probability p. With losses l(theta_r) of every model,

    SSRT_self(i) = mean_{r: i not in S_r} l_i(theta_r) - mean_{r: i in S_r} l_i(theta_r)
    SSRT(i, z)   = mean_{r: i not in S_r} l_z(theta_r) - mean_{r: i in S_r} l_z(theta_r)

Both are a pair of masked means, i.e. two matrix products, never a loop over examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .metrics import columnwise_spearman


def random_subsets(num_examples: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """(R, N) boolean masks: each example is in each subset independently with probability ``fraction``."""
    if not 0.0 < fraction < 1.0:
        raise InputError(f"fraction must be in (0, 1), got {fraction}")
    if num_examples < 1 or num_subsets < 1:
        raise InputError(f"need at least one example and one subset, got {num_examples} and {num_subsets}")
    return np.random.default_rng(seed).random((num_subsets, num_examples)) < fraction


def ssrt_self_influence(masks, train_losses) -> np.ndarray:
    """SSRT_self(i): how much higher example i's loss is when it was left out than when it was trained on. (N,)"""
    masks = _check_masks(masks)
    losses = _check_losses(train_losses, masks.shape, "train_losses")
    inside = masks.astype(np.float64)
    outside = 1.0 - inside
    n_in, n_out = _counts(masks)
    return (outside * losses).sum(axis=0) / n_out - (inside * losses).sum(axis=0) / n_in


def ssrt_train_test_influence(masks, test_losses) -> np.ndarray:
    """SSRT(i, z): how much higher test example z's loss is without training example i than with it. (N, M)"""
    masks = _check_masks(masks)
    losses = _check_losses(test_losses, (masks.shape[0], None), "test_losses")
    inside = masks.astype(np.float64)
    outside = 1.0 - inside
    n_in, n_out = _counts(masks)
    return (outside.T @ losses) / n_out[:, None] - (inside.T @ losses) / n_in[:, None]


@dataclass(frozen=True)
class LinearDatamodelingScore:
    """LDS per test example (Spearman over held-out subsets) and its mean over test examples."""

    per_example: np.ndarray
    mean: float
    stderr: float


def linear_datamodeling_score(scores, holdout_masks, holdout_losses) -> LinearDatamodelingScore:
    """How well summed attributions rank the losses of models retrained on held-out subsets.

    ``scores`` is (N, M) train-test influence with the Z0-Inf sign (positive = proponent:
    training on i lowers z's loss), so the predicted loss of a model trained on S is
    -sum_{i in S} INF(i, z). For each test example z this prediction is rank-correlated
    with the actual losses of the S held-out models; test examples whose loss or prediction
    does not vary over the subsets are left out of the mean.
    """
    scores = np.asarray(scores, dtype=np.float64)
    masks = _check_masks(holdout_masks, need_both=False)
    if scores.ndim != 2 or scores.shape[0] != masks.shape[1]:
        raise InputError(
            f"scores: expected (N={masks.shape[1]} training examples, M test examples), got shape {scores.shape}"
        )
    if not np.isfinite(scores).all():
        raise InputError("scores: hold NaN or inf values")
    losses = _check_losses(holdout_losses, (masks.shape[0], scores.shape[1]), "holdout_losses")
    predicted = -(masks.astype(np.float64) @ scores)  # (S, M)
    per_example = columnwise_spearman(predicted, losses)
    valid = per_example[np.isfinite(per_example)]
    if valid.size == 0:
        raise InputError("LDS: no test example has a loss and a prediction that vary over the subsets")
    stderr = float(valid.std(ddof=1) / np.sqrt(valid.size)) if valid.size > 1 else float("nan")
    return LinearDatamodelingScore(per_example=per_example, mean=float(valid.mean()), stderr=stderr)


def _check_masks(masks, need_both: bool = True) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.dtype != bool or masks.ndim != 2:
        raise InputError(f"masks: expected an (R, N) boolean array, got dtype {masks.dtype}, shape {masks.shape}")
    if masks.shape[0] < 2:
        raise InputError(f"masks: need at least 2 subsets, got {masks.shape[0]}")
    if need_both:
        never_in = np.flatnonzero(~masks.any(axis=0))
        never_out = np.flatnonzero(masks.all(axis=0))
        if never_in.size or never_out.size:
            raise InputError(
                f"masks: SSRT needs every example both inside and outside some subset; {never_in.size} example(s) "
                f"are never inside (columns {never_in[:5].tolist()}) and {never_out.size} never outside "
                f"(columns {never_out[:5].tolist()}); train more models"
            )
    return masks


def _check_losses(losses, shape: tuple[int, int | None], name: str) -> np.ndarray:
    losses = np.asarray(losses, dtype=np.float64)
    rows, cols = shape
    if losses.ndim != 2 or losses.shape[0] != rows or (cols is not None and losses.shape[1] != cols):
        expected = f"({rows} models, {cols if cols is not None else 'M'} examples)"
        raise InputError(f"{name}: expected shape {expected}, got {losses.shape}")
    if not np.isfinite(losses).all():
        raise InputError(f"{name}: holds NaN or inf values")
    return losses


def _counts(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n_in = masks.sum(axis=0).astype(np.float64)
    return n_in, masks.shape[0] - n_in
