"""Rank correlations and detection metrics, vectorised over columns (no loop over examples)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from ..errors import InputError


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks along axis 0 (1-based), ties sharing their average rank, as Spearman's rho needs."""
    values = np.asarray(values, dtype=np.float64)
    frame = pd.DataFrame(values.reshape(values.shape[0], -1))
    return frame.rank(axis=0, method="average").to_numpy().reshape(values.shape)


def columnwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho between matching columns of two (S, M) arrays: (M,), NaN where a column is constant."""
    a, b = _as_2d(a, "a"), _as_2d(b, "b")
    if a.shape != b.shape:
        raise InputError(f"columnwise_spearman: shapes differ, {a.shape} vs {b.shape}")
    if a.shape[0] < 2:
        raise InputError(f"columnwise_spearman: needs at least 2 rows, got {a.shape[0]}")
    ra = average_ranks(a)
    rb = average_ranks(b)
    ra = ra - ra.mean(axis=0)
    rb = rb - rb.mean(axis=0)
    denom = np.sqrt((ra**2).sum(axis=0) * (rb**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(axis=0) / denom, np.nan)


def spearman(a, b) -> float:
    """Spearman's rho of two equal-length 1-D score vectors."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    return float(columnwise_spearman(a[:, None], b[:, None])[0])


@dataclass(frozen=True)
class DetectionScores:
    """How well a score ranks the positives (for example flipped labels) first."""

    auprc: float
    auroc: float
    base_rate: float


def detection_scores(scores, positives) -> DetectionScores:
    """AUPRC (average precision) and AUROC of ``scores`` (higher = more suspicious) against a boolean mask."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positives = np.asarray(positives).reshape(-1)
    if positives.dtype != bool:
        raise InputError(f"positives: expected a boolean mask, got dtype {positives.dtype}")
    if scores.shape != positives.shape:
        raise InputError(f"scores ({scores.size}) and positives ({positives.size}) differ in length")
    if positives.all() or not positives.any():
        raise InputError("positives: needs both positive and negative examples")
    if not np.isfinite(scores).all():
        raise InputError("scores: hold NaN or inf values")
    return DetectionScores(
        auprc=float(average_precision_score(positives, scores)),
        auroc=float(roc_auc_score(positives, scores)),
        base_rate=float(positives.mean()),
    )


def _as_2d(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise InputError(f"{name}: expected a 2-D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError(f"{name}: holds NaN or inf values")
    return x
