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


# ---------------------------------------------------------------------------------------------
# Mixture policy, review budget, which signals flag
# ---------------------------------------------------------------------------------------------


def _bimodal(seed=0, n_low=900, n_high=100):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0.2, 0.05, n_low), rng.normal(2.0, 0.4, n_high)])


def test_mixture_em_matches_sklearn_gaussian_mixture():
    from sklearn.mixture import GaussianMixture

    from z0inf_pipeline.review.policy import fit_mixture

    x = _bimodal()
    ours = fit_mixture(x)
    theirs = GaussianMixture(2, tol=1e-12, max_iter=2000, random_state=0).fit(x[:, None])
    order = np.argsort(theirs.means_[:, 0])
    np.testing.assert_allclose(ours.means, theirs.means_[order, 0], rtol=1e-4)
    np.testing.assert_allclose(ours.stds, np.sqrt(theirs.covariances_[order, 0, 0]), rtol=1e-3)
    np.testing.assert_allclose(ours.weights, theirs.weights_[order], rtol=1e-4)
    np.testing.assert_allclose(ours.high_posterior(x), theirs.predict_proba(x[:, None])[:, order[1]], atol=1e-4)


def test_mixture_flags_the_high_group_and_an_inherited_cutoff_is_kept():
    x = _bimodal()
    flags = flag_scores(x, FlagPolicy())
    assert flags.flagged[900:].all() and not flags.flagged[:900].any()
    assert flags.cutoff == x[flags.flagged].min()
    cleaner = x[:900]  # the same scale without the high group: nothing reaches the cut-off
    assert flag_scores(cleaner, FlagPolicy(), inherited_cutoff=flags.cutoff).count == 0
    # quantile and z-score ignore an inherited cut-off
    assert flag_scores(cleaner, FlagPolicy(method="quantile"), inherited_cutoff=flags.cutoff).count == 90


@pytest.mark.parametrize("method", ["mixture", "quantile", "zscore"])
def test_review_budget_keeps_the_highest_scores(method):
    x = _bimodal(seed=1)
    capped = flag_scores(x, FlagPolicy(method=method, max_flagged=7))
    assert capped.count == 7
    np.testing.assert_array_equal(np.flatnonzero(capped.flagged), np.sort(np.argsort(-x)[:7]))
    assert flag_scores(x, FlagPolicy(method=method, max_flagged=0)).count > 7


def test_flag_score_is_chosen_from_the_frame_and_every_signal_says_whether_it_flags():
    import pandas as pd

    x = _bimodal(seed=2)
    frame = pd.DataFrame(
        {
            "example_id": np.arange(len(x)),
            "self_influence": x[::-1].copy(),  # flags the first 100 instead
            "variance_self_influence": np.ones(len(x)),
            "mean_loss": x,
            "final_loss": x,
            "confidence": np.exp(-x),
            "variability": np.nan,  # undefined: never named
        }
    )
    flags = flag_scores(frame, FlagPolicy(score="mean_loss"))
    assert flags.flagged[900:].all() and flags.count == 100
    assert flags.flagged_by[950] == "mean_loss, final_loss, confidence"
    assert flags.flagged_by[10] == "self_influence"
    assert flags.flagged_by[500] == ""
    ranked = flag_scores(frame, FlagPolicy(score="mean_loss+confidence", method="quantile", quantile=0.95))
    # both signals order examples the same way: their rank average keeps that order
    np.testing.assert_array_equal(np.flatnonzero(ranked.flagged), np.sort(np.argsort(-x)[:50]))
    with pytest.raises(InfluenceInputError, match="variability"):
        flag_scores(frame, FlagPolicy(score="variability"))
    with pytest.raises(InfluenceInputError, match="signal 'loss'"):
        FlagPolicy(score="loss")
