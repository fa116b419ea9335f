"""Flag policy (quantile / robust z-score) and the review gate, checked against hand computations."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from z0inf_pipeline.errors import InputError
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
    with pytest.raises(InputError, match="flag policy"):
        FlagPolicy(**kwargs)


def test_non_finite_scores_are_refused():
    with pytest.raises(InputError, match="NaN or inf"):
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


def test_confident_count_matches_a_per_example_reading_of_confident_learning():
    """Each example checked on its own: does any other class's threshold fit in 1 - p(given label)?"""
    from z0inf_pipeline.review.policy import confident_error_count

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 500)
    mean_loss = rng.exponential(0.4, 500)
    p = np.exp(-mean_loss)
    thresholds = {c: p[labels == c].mean() for c in range(4)}
    expected = sum(any(p[i] <= 1 - thresholds[c] for c in range(4) if c != labels[i]) for i in range(500))
    assert confident_error_count(mean_loss, labels) == expected > 0
    assert confident_error_count(mean_loss, np.zeros(500, dtype=int)) == 0  # one class: nothing to confuse


def _scores_frame(mean_loss):
    import pandas as pd

    return pd.DataFrame({"example_id": np.arange(len(mean_loss)), "mean_loss": mean_loss,
                         "confidence": np.exp(-mean_loss)})


def test_confident_policy_follows_the_noise_where_the_mixture_finds_a_group_anyway():
    """Clean labels with a long tail of hard examples: the mixture still finds a high group, confident
    learning's count (and so the default) flags almost nothing; flipped labels: both flag them."""
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 1000)
    clean = rng.gamma(1.0, 0.05, 1000)  # p(given label) mostly > 0.9, a tail down to ~0.6
    assert flag_scores(clean, FlagPolicy(method="mixture")).count > 30
    confident = FlagPolicy(method="confident")
    assert flag_scores(_scores_frame(clean), confident, labels=labels).count <= 3
    noisy = clean.copy()
    noisy[:100] = rng.normal(2.5, 0.3, 100)  # 100 wrong labels: p(given label) ~ 0.08
    flags = flag_scores(_scores_frame(noisy), confident, labels=labels)
    assert 90 <= flags.count <= 110 and flags.flagged[:100].mean() > 0.9
    # without labels the count is the mixture's
    assert flag_scores(_scores_frame(clean), confident).count == flag_scores(clean, FlagPolicy(method="mixture")).count


def test_mixture_flags_the_high_group_and_an_inherited_cutoff_is_kept():
    x = _bimodal()
    flags = flag_scores(x, FlagPolicy(method="mixture"))
    assert flags.flagged[900:].all() and not flags.flagged[:900].any()
    assert flags.cutoff == x[flags.flagged].min()
    cleaner = x[:900]  # the same scale without the high group: nothing reaches the cut-off
    assert flag_scores(cleaner, FlagPolicy(method="mixture"), inherited_cutoff=flags.cutoff).count == 0
    assert flag_scores(cleaner, FlagPolicy(), inherited_cutoff=flags.cutoff).count == 0
    # quantile and z-score ignore an inherited cut-off
    assert flag_scores(cleaner, FlagPolicy(method="quantile"), inherited_cutoff=flags.cutoff).count == 90


def _loss_frame(values):
    """A loss table frame: (T, N) values at steps 0, 10, 20, ..."""
    import pandas as pd

    return pd.DataFrame({"example_id": np.arange(values.shape[1]),
                         **{f"step_{10 * t}": row for t, row in enumerate(values)}})


def _run_losses(rng, wrong: int, n=1000, m=500, steps=5):
    """Train and held-out loss tables of one run: every example has a difficulty (the same distribution for
    both splits, a long tail of hard ones) and its loss falls as training goes on, a training example's a
    little faster (it is fit); the first ``wrong`` training examples are wrong labels: high loss that
    training memorises by the last checkpoint."""
    decay = np.linspace(1.0, 0.3, steps)[:, None]
    train = rng.gamma(1.0, 0.6, n)[None, :] * decay * np.linspace(1.0, 0.8, steps)[:, None]
    test = rng.gamma(1.0, 0.6, m)[None, :] * decay
    train[0] = rng.gamma(1.0, 0.6, n)  # step 0: nothing trained yet, every example alike
    train[1:, :wrong] = rng.normal(3.0, 0.3, wrong)[None, :] * np.linspace(1.0, 0.05, steps - 1)[:, None]
    return train, test


def test_held_out_excess_matches_a_threshold_by_threshold_count():
    """The largest gap between the training and held-out shares above a loss x >= ln 2, over the trained
    checkpoints, recomputed one threshold at a time; step 0 never counts, and the DKW band decides."""
    from z0inf_pipeline.review.policy import held_out_excess

    rng = np.random.default_rng(5)
    train, test = _run_losses(rng, wrong=60)
    train[0, :300] = 9.0  # a huge gap at step 0 (an untrained model) must not count
    best = max(((train[t] > x).mean() - (test[t] > x).mean(), (train[t] > x).sum(), 10 * t, x)
               for t in range(1, len(train)) for x in train[t][train[t] >= np.log(2)])
    found = held_out_excess(_loss_frame(train), _loss_frame(test))
    assert (found.excess, found.above, found.step) == (round(best[0] * 1000), best[1], best[2])
    assert found.threshold == pytest.approx(best[3]) and 40 <= found.excess <= 80
    assert found.significant == (best[0] > np.sqrt(np.log(40) / 2 * (1 / 1000 + 1 / 500)))
    assert held_out_excess(_loss_frame(train), _loss_frame(test)[["example_id", "step_0"]]) is None  # nothing shared


def test_held_out_count_follows_the_noise_where_hard_examples_abound():
    """Clean labels with a long tail of hard examples (in training and held out alike): the mixture still
    finds a high group, the default flags at most 2% (chance). 100 wrong labels that training memorises by the
    end: the default still counts them (at the checkpoint where they stand out) and flags them."""
    from z0inf_pipeline.review.policy import held_out_excess

    rng = np.random.default_rng(6)
    labels = rng.integers(0, 3, 1000)
    train, test = _run_losses(rng, wrong=0)
    clean = train.mean(axis=0)
    assert flag_scores(clean, FlagPolicy(method="mixture")).count > 30
    tables = (_loss_frame(train), _loss_frame(test))
    assert flag_scores(_scores_frame(clean), FlagPolicy(), labels=labels, loss_tables=tables).count <= 20  # 2%: sampling noise only
    train, test = _run_losses(rng, wrong=100)
    tables = (_loss_frame(train), _loss_frame(test))
    flags = flag_scores(_scores_frame(train.mean(axis=0)), FlagPolicy(), labels=labels, loss_tables=tables)
    assert 85 <= flags.count <= 125 and flags.flagged[:100].mean() > 0.85
    assert flags.counted_by.startswith(f"{held_out_excess(*tables).excess} training losses above")
    # without the held-out table the default counts as ``confident``
    assert (flag_scores(_scores_frame(clean), FlagPolicy(), labels=labels).count
            == flag_scores(_scores_frame(clean), FlagPolicy(method="confident"), labels=labels).count)


@pytest.mark.parametrize("method", ["held_out", "confident", "mixture", "quantile", "zscore"])
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
    with pytest.raises(InputError, match="variability"):
        flag_scores(frame, FlagPolicy(score="variability"))
    with pytest.raises(InputError, match="signal 'loss'"):
        FlagPolicy(score="loss")
