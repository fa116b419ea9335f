"""Which training examples get flagged for review: a flag score, a cut-off on it, and a review budget.

The flag score is one signal of ``influence.signals`` (or a rank average of several) oriented so that
higher is more suspicious. The default cut-off comes from a two-component Gaussian mixture on the score,
as in loss-based label-noise modelling: examples whose posterior of belonging to the high component
exceeds 0.5 are flagged. A run retrained from a reviewed run keeps that run's cut-off (same recipe,
same loss scale), so the flagged count falls as the data gets cleaner, where a fresh mixture or a
quantile would flag a similar share of every run. The quantile and robust z-score cut-offs stay as
options; every method respects the review budget ``max_flagged``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd

from ..influence.errors import InfluenceInputError
from ..influence.signals import SIGNAL_COLUMNS, flag_score, parse_flag_score
from ..settings_schema import check_choices

# 1.4826 * MAD estimates the standard deviation of normally distributed data.
MAD_TO_SIGMA = 1.4826
METHODS = ("mixture", "quantile", "zscore")
_EM_ITERATIONS = 200
_EM_TOLERANCE = 1e-10


@dataclass(frozen=True)
class FlagPolicy:
    """How examples are flagged for review, and how many may stay unreviewed before retraining."""

    score: str = field(
        default="mean_loss",
        metadata={
            "help": "the flag score: one signal, or several joined by '+' (the mean of their suspicion ranks); "
            f"chosen on the benchmark suite's mean AUPRC (signals: {', '.join(SIGNAL_COLUMNS)})",
        },
    )
    method: str = field(
        default="mixture",
        metadata={
            "help": "mixture: flag the high component of a two-Gaussian mixture on the score (none if the score "
            "has no separate high group); quantile: flag above the quantile; zscore: robust z above z_threshold",
            "choices": METHODS,
        },
    )
    quantile: float = field(default=0.9, metadata={"help": "method=quantile: flag scores above this quantile"})
    z_threshold: float = field(
        default=3.5, metadata={"help": "method=zscore: flag robust z = (score - median) / (1.4826 MAD) above this"}
    )
    posterior: float = field(
        default=0.5,
        metadata={"help": "method=mixture: flag where the posterior of the high component exceeds this"},
    )
    inherit_cutoff: bool = field(
        default=True,
        metadata={
            "help": "method=mixture: a retrained run keeps the cut-off found on its nearest reviewed ancestor "
            "(same policy), so a cleaner run flags fewer examples instead of a fresh mixture's share"
        },
    )
    max_flagged: int = field(
        default=1000,
        metadata={"help": "review budget: flag at most this many examples, highest scores first (0: no cap)"},
    )
    max_unreviewed_fraction: float = field(
        default=0.0,
        metadata={
            "help": "share of the training set that may be flagged yet have no decision before the review gate "
            "blocks retraining (0: every flagged example needs a decision)"
        },
    )

    def __post_init__(self) -> None:
        check_choices(self, "flag policy")
        parse_flag_score(self.score)
        if not 0.0 < self.quantile < 1.0:
            raise InfluenceInputError(f"flag policy: quantile {self.quantile} must be strictly between 0 and 1")
        if not np.isfinite(self.z_threshold) or self.z_threshold <= 0:
            raise InfluenceInputError(f"flag policy: z_threshold {self.z_threshold} must be a positive number")
        if not 0.0 < self.posterior < 1.0:
            raise InfluenceInputError(f"flag policy: posterior {self.posterior} must be strictly between 0 and 1")
        if not isinstance(self.max_flagged, (int, np.integer)) or self.max_flagged < 0:
            raise InfluenceInputError(f"flag policy: max_flagged {self.max_flagged!r} must be an integer >= 0")
        if not 0.0 <= self.max_unreviewed_fraction <= 1.0:
            raise InfluenceInputError(
                f"flag policy: max_unreviewed_fraction {self.max_unreviewed_fraction} must be in [0, 1]"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.method == "mixture":
            rule = f"{self.score} in the high component of a two-Gaussian mixture (posterior > {self.posterior:g})"
        elif self.method == "quantile":
            rule = f"{self.score} above its {self.quantile:.3g} quantile (top {100 * (1 - self.quantile):.3g}%)"
        else:
            rule = f"robust z-score of {self.score} above {self.z_threshold:g} (median / MAD)"
        return rule + (f", at most {self.max_flagged} highest" if self.max_flagged else "")


@dataclass(frozen=True)
class Flags:
    """The outcome of a policy: the flag score, the cut-off on it, who is flagged, and robust z-scores."""

    cutoff: float
    flagged: np.ndarray
    robust_z: np.ndarray
    score: np.ndarray
    # Per example, the signals that flag it on their own under the same policy, joined by ", "
    # ("" for none); None when only a score vector was given.
    flagged_by: np.ndarray | None = None

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


@dataclass(frozen=True)
class Mixture:
    """A two-component 1-D Gaussian mixture: (low, high) weights, means and standard deviations."""

    weights: np.ndarray
    means: np.ndarray
    stds: np.ndarray

    def high_posterior(self, x: np.ndarray) -> np.ndarray:
        log_density = (
            np.log(self.weights)[None, :]
            - np.log(self.stds)[None, :]
            - 0.5 * ((x[:, None] - self.means[None, :]) / self.stds[None, :]) ** 2
        )
        log_density -= log_density.max(axis=1, keepdims=True)
        density = np.exp(log_density)
        return density[:, 1] / density.sum(axis=1)


def fit_mixture(x: np.ndarray) -> Mixture:
    """Two-Gaussian EM on a 1-D sample, vectorised over the sample (the loop is over iterations).

    Started from the lower half and the top tenth so that a small high group is found; a floor on
    the variances (1e-6 of the sample's) keeps a component from collapsing onto tied values.
    """
    x = np.asarray(x, dtype=np.float64)
    spread = float(x.var())
    if len(x) < 2 or spread == 0:
        return Mixture(np.array([1.0, 1e-12]), np.array([x.mean(), x.mean()]), np.ones(2))
    floor = 1e-6 * spread
    low, high = x <= np.quantile(x, 0.5), x >= np.quantile(x, 0.9)
    means = np.array([x[low].mean(), x[high].mean()])
    variances = np.array([max(x[low].var(), floor), max(x[high].var(), floor)])
    weights = np.array([0.9, 0.1])
    previous = -np.inf
    for _ in range(_EM_ITERATIONS):
        log_p = np.log(weights) - 0.5 * np.log(2 * np.pi * variances) - 0.5 * (x[:, None] - means) ** 2 / variances
        top = log_p.max(axis=1, keepdims=True)
        log_total = top[:, 0] + np.log(np.exp(log_p - top).sum(axis=1))
        responsibility = np.exp(log_p - log_total[:, None])
        mass = responsibility.sum(axis=0).clip(min=1e-12)
        weights = mass / len(x)
        means = (responsibility * x[:, None]).sum(axis=0) / mass
        variances = np.maximum((responsibility * (x[:, None] - means) ** 2).sum(axis=0) / mass, floor)
        likelihood = float(log_total.mean())
        if likelihood - previous < _EM_TOLERANCE:
            break
        previous = likelihood
    order = np.argsort(means)
    return Mixture(weights[order], means[order], np.sqrt(variances[order]))


def flag_scores(scores, policy: FlagPolicy, *, inherited_cutoff: float | None = None) -> Flags:
    """Flag examples by ``policy``: ``scores`` is the scores frame (its ``policy.score`` signal is used,
    and every defined signal is also flagged on its own for ``Flags.flagged_by``) or a vector that
    already is the flag score (higher = more suspicious).

    ``inherited_cutoff`` (method ``mixture``): flag scores at or above it instead of fitting a mixture
    to this run (see ``inherited_cutoff`` in ``review.lineage``).
    """
    if not isinstance(scores, pd.DataFrame):
        return _flag_values(scores, policy, inherited_cutoff)
    flags = _flag_values(flag_score(scores, policy.score), policy, inherited_cutoff)
    defined = [c for c in SIGNAL_COLUMNS if c in scores and scores[c].notna().all()]
    joined = pd.Series("", index=range(len(scores)), dtype=object)
    for column in defined:
        alone = _flag_values(flag_score(scores, column), replace(policy, score=column)).flagged
        joined = joined + np.where(alone, column + ", ", "")
    flagged_by = joined.str.removesuffix(", ").to_numpy(dtype=object)
    return replace(flags, flagged_by=flagged_by)


def _flag_values(values, policy: FlagPolicy, inherited_cutoff: float | None = None) -> Flags:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise InfluenceInputError(f"flag policy: expected a non-empty vector of scores, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise InfluenceInputError(f"flag policy: {int((~np.isfinite(values)).sum())} score(s) are NaN or inf")
    z, median, scale = robust_z(values)
    if policy.method == "quantile":
        cutoff = float(np.quantile(values, policy.quantile))
        flagged = values > cutoff
    elif policy.method == "zscore":
        cutoff = median + policy.z_threshold * scale
        flagged = z > policy.z_threshold
    elif inherited_cutoff is not None:
        cutoff = float(inherited_cutoff)
        flagged = values >= cutoff
    else:
        mixture = fit_mixture(values)
        # Above the low component's mean only: a wide high component also wins far in the low tail.
        flagged = (mixture.high_posterior(values) > policy.posterior) & (values > mixture.means[0])
        cutoff = float(values[flagged].min()) if flagged.any() else float("inf")
    if policy.max_flagged and flagged.sum() > policy.max_flagged:
        order = np.argsort(-values, kind="stable")
        kept = np.zeros_like(flagged)
        kept[order[: policy.max_flagged]] = True
        flagged &= kept
        cutoff = float(values[flagged].min())
    return Flags(cutoff, flagged, z, values)
