"""The GX suites accept good tables and name exactly what is wrong with bad ones."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from z0inf_pipeline.influence.signals import SIGNAL_COLUMNS
from z0inf_pipeline.quality import (
    validate_curated_set,
    validate_loss_table,
    validate_self_influence,
    validate_topk,
)

STEPS = [0, 5, 10]


def loss_frame(n: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    data = {"example_id": np.arange(100, 100 + n, dtype=np.int64)}
    for s in STEPS:
        data[f"step_{s}"] = rng.uniform(0.0, 2.0, n).astype(np.float32)
    return pd.DataFrame(data)


def failed(report) -> set[tuple[str, str | None]]:
    return {(f.expectation, f.column) for f in report.failures}


def test_good_loss_table_passes():
    report = validate_loss_table(loss_frame(), STEPS, expected_rows=6)
    assert report.success, report.summary()
    assert report.evaluated == 7
    assert report.rows == 6


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (
            lambda f: f.assign(step_5=f["step_5"].where(f.index != 2, np.nan)),
            ("expect_column_values_to_be_between", "nonfinite_losses"),
        ),
        (
            lambda f: f.assign(step_10=f["step_10"].where(f.index != 1, np.inf)),
            ("expect_column_values_to_be_between", "nonfinite_losses"),
        ),
        (
            lambda f: f.assign(step_0=f["step_0"].where(f.index != 0, -0.5)),
            ("expect_column_values_to_be_between", "lowest_loss"),
        ),
        (
            lambda f: f.assign(example_id=[100, 100, 102, 103, 104, 105]),
            ("expect_column_values_to_be_unique", "example_id"),
        ),
        (
            lambda f: f[["example_id", "step_5", "step_0", "step_10"]],
            ("expect_table_columns_to_match_ordered_list", None),
        ),
        (lambda f: f.iloc[:5], ("expect_table_row_count_to_equal", None)),
    ],
    ids=["nan", "inf", "negative", "duplicate-id", "step-order", "row-count"],
)
def test_bad_loss_table_names_the_problem(corrupt, expected):
    report = validate_loss_table(corrupt(loss_frame()), STEPS, expected_rows=6)
    assert not report.success
    assert expected in failed(report), report.summary()


def test_negative_losses_allowed_for_signed_loss():
    frame = loss_frame()
    frame["step_0"] = -frame["step_0"]
    assert validate_loss_table(frame, STEPS, expected_rows=6, nonnegative=False).success
    assert not validate_loss_table(frame, STEPS, expected_rows=6).success


def si_frame(ids) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame(
        {
            "example_id": np.asarray(ids, dtype=np.int64),
            **{column: rng.exponential(1.0, len(ids)) for column in SIGNAL_COLUMNS},
        }
    ).assign(confidence=lambda f: np.exp(-f["mean_loss"]))  # a probability


def test_self_influence_suite():
    ids = np.arange(20)
    assert validate_self_influence(si_frame(ids), ids).success
    # ids that do not match the loss table
    report = validate_self_influence(si_frame(np.arange(1, 21)), ids)
    assert ("expect_column_values_to_be_in_set", "example_id_in_loss_table") in failed(report)
    # a clearly negative score (not float32 rounding)
    bad = si_frame(ids)
    bad.loc[3, "self_influence"] = -0.5
    assert ("expect_column_values_to_be_between", "self_influence") in failed(validate_self_influence(bad, ids))
    # non-finite
    bad = si_frame(ids)
    bad.loc[4, "variance_self_influence"] = np.inf
    assert ("expect_column_values_to_be_between", "variance_self_influence") in failed(
        validate_self_influence(bad, ids)
    )


def test_self_influence_tolerates_rounding_below_zero_only():
    ids = np.arange(5)
    frame = si_frame(ids)
    frame.loc[0, "self_influence"] = -1e-9 * frame["self_influence"].max()
    assert validate_self_influence(frame, ids).success


def topk_frame(test_ids, train_ids, k):
    rng = np.random.default_rng(2)
    rows = []
    for z in test_ids:
        pro = np.sort(rng.uniform(0, 1, k))[::-1]
        con = -np.sort(rng.uniform(0, 1, k))[::-1]
        for r in range(k):
            rows.append((z, r + 1, int(rng.choice(train_ids)), pro[r], int(rng.choice(train_ids)), con[r]))
    return pd.DataFrame(
        rows, columns=["test_example_id", "rank", "proponent_id", "proponent_score", "opponent_id", "opponent_score"]
    )


def test_topk_suite():
    train_ids, test_ids = np.arange(50), np.arange(100, 110)
    frame = topk_frame(test_ids, train_ids, 3)
    assert validate_topk(frame, train_ids, test_ids, 3).success
    bad = frame.copy()
    bad.loc[0, "proponent_id"] = 999
    assert ("expect_column_values_to_be_in_set", "proponent_id_in_training_set") in failed(
        validate_topk(bad, train_ids, test_ids, 3)
    )
    bad = frame.copy()
    bad.loc[1, "opponent_score"] = np.nan
    assert ("expect_column_values_to_not_be_null", "opponent_score") in failed(
        validate_topk(bad, train_ids, test_ids, 3)
    )


def test_curated_set_suite():
    train_ids = np.arange(10)
    frame = pd.DataFrame({"example_id": np.arange(2, 10), "label": [1] * 8})
    assert validate_curated_set(frame, train_ids, [0, 1], {5: 1}).success
    report = validate_curated_set(frame, train_ids, [0, 1, 2], {5: 3})
    assert ("expect_column_values_to_be_in_set", "dropped_by_review") in failed(report)
    assert ("expect_column_values_to_be_in_set", "relabel_applied") in failed(report)


def test_failures_name_the_count_and_the_offending_values():
    frame = loss_frame()
    frame.loc[2, "step_5"] = np.nan
    frame.loc[4, "step_10"] = -3.0
    report = validate_loss_table(frame, STEPS, expected_rows=6, expected_ids=np.arange(101, 107))
    observed = {(f.expectation, f.column): f.observed for f in report.failures}
    assert observed == {
        ("expect_column_values_to_be_between", "nonfinite_losses"): "1 unexpected value(s), e.g. [1]",
        ("expect_column_values_to_be_between", "lowest_loss"): "1 unexpected value(s), e.g. [-3.0]",
        ("expect_column_values_to_be_in_set", "example_id_in_split"): "1 unexpected value(s), e.g. [False]",
    }
    assert report.evaluated == 7 and report.rows == 6
