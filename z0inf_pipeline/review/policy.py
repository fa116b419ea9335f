"""Which training examples get flagged for review: self-influence above a configurable cut-off."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from ..influence.errors import InfluenceInputError
from ..settings_schema import check_choices

# 1.4826 * MAD estimates the standard deviation of normally distributed data.
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class FlagPolicy:
    """Flag the top ``1 - quantile`` of scores (``method="quantile"``) or every score whose robust
    z-score, (score - median) / (1.4826 * MAD), exceeds ``z_threshold`` (``method="zscore"``).

    ``max_unreviewed_fraction``: how large a share of the training set may be flagged yet
    unreviewed before the review gate blocks retraining (0: every flagged example needs a decision).
    """

    method: Literal["quantile", "zscore"] = field(
        default="quantile", metadata={"help": "flag by top quantile, or by robust z-score"}
    )
    quantile: float = field(default=0.9, metadata={"help": "flag self-influence above this quantile"})
    z_threshold: float = field(
        default=3.5, metadata={"help": "flag robust z-scores, (score - median) / (1.4826 MAD), above this"}
    )
    max_unreviewed_fraction: float = field(
        default=0.0, metadata={"help": "share of the training set that may stay flagged but undecided"}
    )

    def __post_init__(self) -> None:
        check_choices(self, "flag policy")
        if not 0.0 < self.quantile < 1.0:
            raise InfluenceInputError(f"flag policy: quantile {self.quantile} must be strictly between 0 and 1")
        if not np.isfinite(self.z_threshold) or self.z_threshold <= 0:
            raise InfluenceInputError(f"flag policy: z_threshold {self.z_threshold} must be a positive number")
        if not 0.0 <= self.max_unreviewed_fraction <= 1.0:
            raise InfluenceInputError(
                f"flag policy: max_unreviewed_fraction {self.max_unreviewed_fraction} must be in [0, 1]"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.method == "quantile":
            return f"self-influence above its {self.quantile:.3g} quantile (top {100 * (1 - self.quantile):.3g}%)"
        return f"robust z-score of self-influence above {self.z_threshold:g} (median / MAD)"


@dataclass(frozen=True)
class Flags:
    """The outcome of a policy on a score vector: the cut-off, who is flagged, and robust z-scores."""

    cutoff: float
    flagged: np.ndarray
    robust_z: np.ndarray

    @property
    def count(self) -> int:
        return int(self.flagged.sum())

    @property
    def fraction(self) -> float:
        return float(self.flagged.mean()) if len(self.flagged) else 0.0


def robust_z(scores: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(z, median, scale) with scale = 1.4826 * MAD. With MAD = 0 every score above the median is
    infinitely far out (z = +inf), every score at it z = 0."""
    scores = np.asarray(scores, dtype=np.float64)
    median = float(np.median(scores))
    scale = MAD_TO_SIGMA * float(np.median(np.abs(scores - median)))
    diff = scores - median
    if scale > 0:
        return diff / scale, median, scale
    with np.errstate(invalid="ignore"):
        return np.where(diff == 0, 0.0, np.sign(diff) * np.inf), median, scale


def flag_scores(scores, policy: FlagPolicy) -> Flags:
    """Flag scores strictly above the policy's cut-off."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) == 0:
        raise InfluenceInputError(f"flag policy: expected a non-empty vector of scores, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise InfluenceInputError(f"flag policy: {int((~np.isfinite(scores)).sum())} score(s) are NaN or inf")
    z, median, scale = robust_z(scores)
    if policy.method == "quantile":
        cutoff = float(np.quantile(scores, policy.quantile))
        flagged = scores > cutoff
    else:
        cutoff = median + policy.z_threshold * scale
        flagged = z > policy.z_threshold
    return Flags(cutoff, flagged, z)
