"""Flag policy (quantile / robust z-score) and the review gate, checked against hand computations."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from z0inf_pipeline.influence.errors import InfluenceInputError
from z0inf_pipeline.review import FlagPolicy, evaluate_gate, flag_scores


def test_quantile_policy_flags_the_top_share():
    rng = np.random.default_rng(0)
    scores = rng.permutation(np.arange(100, dtype=np.float64))
    flags = flag_scores(scores, FlagPolicy(method="quantile", quantile=0.9))
    assert flags.count == 10
    assert set(np.flatnonzero(flags.flagged)) == set(np.argsort(scores)[-10:])
    assert flags.cutoff == pytest.approx(89.1)
    assert flags.fraction == pytest.approx(0.1)


def test_zscore_policy_uses_median_and_mad():
    scores = np.array([1.0, 1.2, 0.9, 1.1, 1.0, 0.95, 1.05, 9.0, 3.0])
    median = statistics.median(scores)
    mad = statistics.median(abs(s - median) for s in scores)
    expected_z = (scores - median) / (1.4826 * mad)
    flags = flag_scores(scores, FlagPolicy(method="zscore", z_threshold=3.5))
    np.testing.assert_allclose(flags.robust_z, expected_z)
    assert list(np.flatnonzero(flags.flagged)) == [i for i, z in enumerate(expected_z) if z > 3.5] == [7, 8]
    assert flags.cutoff == pytest.approx(median + 3.5 * 1.4826 * mad)


def test_zscore_with_zero_mad_flags_everything_above_the_median():
    scores = np.array([1.0, 1.0, 1.0, 1.0, 2.0])
    flags = flag_scores(scores, FlagPolicy(method="zscore"))
    assert list(np.flatnonzero(flags.flagged)) == [4]


@pytest.mark.parametrize(
    "kwargs",
    [{"method": "top"}, {"quantile": 1.0}, {"quantile": 0.0}, {"z_threshold": -1}, {"max_unreviewed_fraction": 1.5}],
)
def test_bad_policy_is_refused(kwargs):
    with pytest.raises(InfluenceInputError, match="flag policy"):
        FlagPolicy(**kwargs)


def test_non_finite_scores_are_refused():
    with pytest.raises(InfluenceInputError, match="NaN or inf"):
        flag_scores(np.array([1.0, np.nan]), FlagPolicy())


def test_gate_counts_flagged_without_decision_against_training_set():
    status = evaluate_gate([1, 2, 3, 4], decided_ids=[2, 4, 99], training_examples=100, max_unreviewed_fraction=0.0)
    assert (status.flagged, status.reviewed, status.unreviewed) == (4, 2, 2)
    assert status.unreviewed_ids == (1, 3)
    assert status.unreviewed_fraction == pytest.approx(0.02)
    assert not status.passed
    assert "BLOCKED" in status.message() and "2 of 4" in status.message()
    assert evaluate_gate([1, 2, 3, 4], [2, 4], 100, max_unreviewed_fraction=0.02).passed
    assert evaluate_gate([1, 2], [1, 2], 100, 0.0).passed
