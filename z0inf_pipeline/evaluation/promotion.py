"""Does a retrained model beat the one in service? A paired bootstrap on the same held-out examples.

Each held-out example gives one gain of the retrained model over the incumbent: ``correct(retrained) -
correct(incumbent)`` for a classifier (in {-1, 0, 1}), ``loss(incumbent) - loss(retrained)`` for a
language model (nats). Resampling the examples (the same draw for both models: paired) gives a
percentile interval on the mean gain. The rule: the retrained model becomes ``champion`` only when the
review gate passed for its lineage and the interval's lower end is at least ``margin``; otherwise it is
a ``challenger``. Pure numpy: no MLflow, no Dagster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pydantic import Field, model_validator

from ..arguments import Settings

from ..errors import ConfigurationError, InputError

_RESAMPLE_ELEMENTS = 1 << 22  # indices drawn at once: resamples are vectorised in blocks of this many


class PromotionPolicy(Settings):
    """When a retrained model replaces the champion in the MLflow Model Registry."""

    owner: ClassVar[str] = "promotion policy"

    margin: float = Field(
        0.0,
        description="champion moves only when the lower end of the interval on the mean per-example gain "
        "(retrained minus champion: accuracy for classifiers, loss in nats for LM runs) is at least this",
    )
    confidence: float = Field(0.95, description="two-sided confidence of the paired bootstrap interval on the gain")
    resamples: int = Field(2000, description="bootstrap resamples of the held-out examples")
    seed: int = Field(0, description="seed of the bootstrap's resampling")

    @model_validator(mode="after")
    def _check(self) -> "PromotionPolicy":
        if not 0.0 < self.confidence < 1.0:
            raise ConfigurationError(f"promotion policy: confidence={self.confidence} must be strictly between 0 and 1")
        if self.resamples < 100:
            raise ConfigurationError(f"promotion policy: resamples={self.resamples} must be at least 100")
        if not np.isfinite(self.margin):
            raise ConfigurationError(f"promotion policy: margin={self.margin} must be a finite number")
        return self


@dataclass(frozen=True)
class GainInterval:
    """The mean per-example gain of the retrained model and its paired bootstrap interval."""

    mean: float
    low: float
    high: float
    confidence: float
    examples: int
    better: int  # examples where the retrained model does better
    worse: int

    def describe(self, unit: str) -> str:
        return (f"gain {self.mean:+.4f} {unit}, {self.confidence:.0%} interval [{self.low:+.4f}, {self.high:+.4f}] "
                f"over {self.examples} held-out examples ({self.better} better, {self.worse} worse)")


def paired_bootstrap(gains: np.ndarray, *, confidence: float = 0.95, resamples: int = 2000,
                     seed: int = 0) -> GainInterval:
    """Percentile interval of the mean of ``gains`` (one per held-out example) over ``resamples``
    resamples with replacement; resamples are drawn in blocks (one (B, n) index array per block)."""
    gains = np.asarray(gains, dtype=np.float64)
    if gains.ndim != 1 or len(gains) == 0 or not np.isfinite(gains).all():
        raise InputError(f"paired bootstrap: gains must be a non-empty 1-d array of finite numbers, got shape "
                         f"{gains.shape}")
    rng = np.random.default_rng(seed)
    n = len(gains)
    block = max(1, _RESAMPLE_ELEMENTS // n)
    means = np.concatenate([
        gains[rng.integers(0, n, size=(min(block, resamples - start), n))].mean(axis=1)
        for start in range(0, resamples, block)
    ])
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return GainInterval(float(gains.mean()), float(low), float(high), confidence, n,
                        int((gains > 0).sum()), int((gains < 0).sum()))


@dataclass(frozen=True)
class PromotionDecision:
    alias: str  # "champion" or "challenger"
    reason: str

    @property
    def promoted(self) -> bool:
        return self.alias == "champion"


def decide_promotion(gate_passed: bool, interval: GainInterval, margin: float, *, unit: str,
                     compared_with: str, gate: str = "") -> PromotionDecision:
    """``champion`` only when the gate passed and ``interval.low >= margin``; else ``challenger``, with why
    (``gate``: what the gate's record says, quoted when it did not pass)."""
    measured = f"against {compared_with}: {interval.describe(unit)}"
    if not gate_passed:
        said = f" ({gate})" if gate else ""
        return PromotionDecision("challenger", f"the review gate never passed for this lineage{said}; {measured}")
    if interval.low < margin:
        return PromotionDecision(
            "challenger", f"the interval's lower end {interval.low:+.4f} is below the margin {margin:+g}; {measured}"
        )
    return PromotionDecision(
        "champion", f"gate passed and the lower end {interval.low:+.4f} >= margin {margin:+g}; {measured}"
    )
