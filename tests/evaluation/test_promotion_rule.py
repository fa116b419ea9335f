"""The paired bootstrap and the promotion rule, pure: intervals checked against SciPy's bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import bootstrap

from z0inf_pipeline.errors import ConfigurationError, InputError
from z0inf_pipeline.evaluation.promotion import PromotionPolicy, decide_promotion, paired_bootstrap


@pytest.mark.parametrize("better, worse, n", [(19, 6, 450), (18, 9, 450), (3, 12, 200), (0, 0, 100)])
def test_interval_matches_scipy_percentile_bootstrap(better, worse, n):
    gains = np.zeros(n)
    gains[:better], gains[better : better + worse] = 1.0, -1.0
    ours = paired_bootstrap(gains, resamples=20000, seed=1)
    theirs = bootstrap((gains,), np.mean, confidence_level=0.95, n_resamples=20000, method="percentile",
                       random_state=np.random.default_rng(2)).confidence_interval
    assert ours.mean == pytest.approx((better - worse) / n)
    assert ours.low == pytest.approx(theirs.low, abs=1.5 / n) and ours.high == pytest.approx(theirs.high, abs=1.5 / n)
    assert (ours.better, ours.worse, ours.examples) == (better, worse, n)


def test_resamples_are_drawn_in_blocks_without_changing_the_answer(monkeypatch):
    gains = np.random.default_rng(0).normal(0.01, 0.2, size=300)
    whole = paired_bootstrap(gains, resamples=999, seed=3)
    monkeypatch.setattr("z0inf_pipeline.evaluation.promotion._RESAMPLE_ELEMENTS", 300 * 7)  # blocks of 7 resamples
    assert paired_bootstrap(gains, resamples=999, seed=3) == whole


def test_champion_needs_the_gate_and_the_margin():
    interval = paired_bootstrap(np.r_[np.ones(30), -np.ones(5), np.zeros(400)])
    assert interval.low > 0
    assert decide_promotion(True, interval, 0.0, unit="accuracy", compared_with="v1").promoted
    assert not decide_promotion(True, interval, interval.low + 1e-9, unit="accuracy", compared_with="v1").promoted
    refused = decide_promotion(False, interval, -1.0, unit="accuracy", compared_with="v1")
    assert refused.alias == "challenger" and "gate never passed" in refused.reason


@pytest.mark.parametrize("bad", [dict(confidence=1.0), dict(resamples=10), dict(margin=float("nan"))])
def test_bad_policies_are_named(bad):
    with pytest.raises(ConfigurationError, match=next(iter(bad))):
        PromotionPolicy(**bad)


def test_bad_gains_are_named():
    with pytest.raises(InputError, match="paired bootstrap"):
        paired_bootstrap(np.array([0.0, np.nan]))
