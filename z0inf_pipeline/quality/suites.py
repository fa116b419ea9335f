"""Great Expectations 1.x suites for the pipeline's tables: pure data checks that know nothing of Dagster.

Each ``validate_*`` function builds an ExpectationSuite for one kind of table, runs it on a
pandas DataFrame through an ephemeral GX context (pandas datasource -> dataframe asset ->
whole-dataframe batch definition) and returns a ``SuiteReport``: the caller decides what a
failure means (the Dagster asset checks in ``z0inf_pipeline.defs.checks`` turn it into a
blocking check result).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from ..influence.loss_tables import step_column
from ..influence.signals import SIGNAL_COLUMNS

FLOAT_MAX = float(np.finfo(np.float64).max)
# Self-influence is a sum of squared norms, so >= 0 exactly; the quadratic form is evaluated in
# float32, whose rounding can leave values a hair below zero. Tolerate that much and no more.
SELF_INFLUENCE_RTOL = 1e-6


@dataclass(frozen=True)
class ExpectationFailure:
    """One failed expectation: what was expected, on which column, and what was seen instead."""

    expectation: str
    column: str | None
    observed: str

    def __str__(self) -> str:
        where = f" on '{self.column}'" if self.column else ""
        return f"{self.expectation}{where}: {self.observed}"


@dataclass(frozen=True)
class SuiteReport:
    """Outcome of one suite on one table."""

    suite: str
    success: bool
    evaluated: int
    rows: int
    failures: tuple[ExpectationFailure, ...] = field(default=())

    def summary(self) -> str:
        if self.success:
            return f"{self.suite}: all {self.evaluated} expectations met on {self.rows} rows"
        lines = [f"{self.suite}: {len(self.failures)} of {self.evaluated} expectations failed on {self.rows} rows"]
        lines += [f"  - {failure}" for failure in self.failures]
        return "\n".join(lines)


def run_suite(name: str, frame: pd.DataFrame, expectations: Sequence) -> SuiteReport:
    """Validate ``frame`` against ``expectations`` in a throwaway GX context."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch_definition = (
        context.data_sources.add_pandas(name="z0inf")
        .add_dataframe_asset(name=name)
        .add_batch_definition_whole_dataframe(name="whole_table")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=list(expectations)))
    result = batch_definition.get_batch(batch_parameters={"dataframe": frame}).validate(suite)
    failures = tuple(_describe(r) for r in result.results if not r.success)
    return SuiteReport(name, bool(result.success), len(result.results), len(frame), failures)


def validate_loss_table(
    frame: pd.DataFrame,
    steps: Sequence[int],
    expected_rows: int,
    *,
    name: str = "loss_table",
    nonnegative: bool = True,
    expected_ids: Sequence[int] | None = None,
) -> SuiteReport:
    """A loss table: ``example_id`` then one column per checkpoint in step order, one row per example,
    unique ids, every loss finite (and >= 0 for a non-negative loss such as cross-entropy)."""
    import great_expectations.expectations as gxe

    step_columns = [step_column(s) for s in steps]
    low = 0.0 if nonnegative else -FLOAT_MAX
    expectations = [
        gxe.ExpectTableColumnsToMatchOrderedList(column_list=["example_id", *step_columns]),
        gxe.ExpectTableRowCountToEqual(value=int(expected_rows)),
        gxe.ExpectColumnValuesToNotBeNull(column="example_id"),
        gxe.ExpectColumnValuesToBeUnique(column="example_id"),
    ]
    if expected_ids is not None:
        expectations.append(_ids_equal("example_id", expected_ids))
    for column in step_columns:
        expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=column))
        expectations.append(gxe.ExpectColumnValuesToBeBetween(column=column, min_value=low, max_value=FLOAT_MAX))
    return run_suite(name, frame, expectations)


def validate_self_influence(
    frame: pd.DataFrame, loss_table_ids: Sequence[int], *, name: str = "self_influence"
) -> SuiteReport:
    """Self-influence scores: finite, >= 0 (up to float32 rounding), one row per loss-table example."""
    import great_expectations.expectations as gxe

    scale = float(np.abs(frame["self_influence"]).max()) if "self_influence" in frame and len(frame) else 0.0
    floor = -SELF_INFLUENCE_RTOL * scale if np.isfinite(scale) else 0.0
    expectations = [
        gxe.ExpectTableColumnsToMatchOrderedList(column_list=["example_id", *SIGNAL_COLUMNS]),
        gxe.ExpectTableRowCountToEqual(value=len(loss_table_ids)),
        gxe.ExpectColumnValuesToBeUnique(column="example_id"),
        _ids_equal("example_id", loss_table_ids),
    ]
    for column in ("self_influence", "variance_self_influence"):
        expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=column))
        expectations.append(
            gxe.ExpectColumnValuesToBeBetween(
                column=column, min_value=floor if column == "self_influence" else 0.0, max_value=FLOAT_MAX
            )
        )
    return run_suite(name, frame, expectations)


def validate_topk(
    frame: pd.DataFrame, train_ids: Sequence[int], test_ids: Sequence[int], k: int, *, name: str = "train_test_topk"
) -> SuiteReport:
    """Top-k train-test influence: k finite rows per test example, ids from the loss tables,
    proponents scored at least as high as opponents."""
    import great_expectations.expectations as gxe

    columns = ["test_example_id", "rank", "proponent_id", "proponent_score", "opponent_id", "opponent_score"]
    expectations = [
        gxe.ExpectTableColumnsToMatchOrderedList(column_list=columns),
        gxe.ExpectTableRowCountToEqual(value=len(test_ids) * int(k)),
        _ids_equal("test_example_id", test_ids),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["test_example_id", "rank"]),
        gxe.ExpectColumnValuesToBeBetween(column="rank", min_value=1, max_value=int(k)),
        gxe.ExpectColumnValuesToBeInSet(column="proponent_id", value_set=_as_int_list(train_ids)),
        gxe.ExpectColumnValuesToBeInSet(column="opponent_id", value_set=_as_int_list(train_ids)),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="proponent_score", column_B="opponent_score", or_equal=True
        ),
    ]
    for column in ("proponent_score", "opponent_score"):
        expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=column))
        expectations.append(gxe.ExpectColumnValuesToBeBetween(column=column, min_value=-FLOAT_MAX, max_value=FLOAT_MAX))
    return run_suite(name, frame, expectations)


def validate_curated_set(
    frame: pd.DataFrame,
    train_ids: Sequence[int],
    dropped_ids: Sequence[int],
    relabels: dict[int, int],
    *,
    name: str = "curated_training_set",
) -> SuiteReport:
    """A curated training set: training ids only, no dropped id, every relabel applied."""
    import great_expectations.expectations as gxe

    kept = sorted(set(_as_int_list(train_ids)) - set(_as_int_list(dropped_ids)))
    expectations = [
        gxe.ExpectColumnValuesToBeUnique(column="example_id"),
        _ids_equal("example_id", kept),
        gxe.ExpectColumnValuesToNotBeNull(column="label"),
    ]
    if dropped_ids:  # implied by the id set above, but names the failure precisely: a dropped id came back
        expectations.append(
            gxe.ExpectColumnValuesToNotBeInSet(column="example_id", value_set=_as_int_list(dropped_ids))
        )
    report = run_suite(name, frame, expectations)
    wrong = _relabels_not_applied(frame, relabels)
    if not wrong:
        return report
    failure = ExpectationFailure("relabels_applied", "label", f"{len(wrong)} relabel(s) missing, e.g. {wrong[:5]}")
    return SuiteReport(name, False, report.evaluated + 1, report.rows, (*report.failures, failure))


def _relabels_not_applied(frame: pd.DataFrame, relabels: dict[int, int]) -> list[tuple[int, int, int | None]]:
    """(id, wanted, found) for each relabel the curated frame does not carry."""
    if not relabels:
        return []
    labels = dict(zip(frame["example_id"].astype(int), frame["label"]))
    return [(i, y, labels.get(i)) for i, y in sorted(relabels.items()) if labels.get(i) != y]


def _ids_equal(column: str, ids: Sequence[int]):
    import great_expectations.expectations as gxe

    return gxe.ExpectColumnDistinctValuesToEqualSet(column=column, value_set=_as_int_list(ids))


def _as_int_list(ids) -> list[int]:
    return [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]


def _describe(result) -> ExpectationFailure:
    config = result.expectation_config
    kwargs = config.kwargs or {}
    column = kwargs.get("column") or (
        ", ".join(kwargs["column_list"])
        if "column_list" in kwargs and config.type != "expect_table_columns_to_match_ordered_list"
        else None
    )
    details = result.result or {}
    parts = []
    if details.get("observed_value") is not None:
        parts.append(f"observed {_short(details['observed_value'])}")
    if details.get("unexpected_count"):
        parts.append(
            f"{details['unexpected_count']} unexpected value(s), e.g. {_short(details.get('partial_unexpected_list'))}"
        )
    if details.get("partial_missing_list"):
        parts.append(f"missing {_short(details['partial_missing_list'])}")
    info = result.exception_info or {}
    if isinstance(info, dict) and info.get("raised_exception"):
        parts.append(f"could not be evaluated: {info.get('exception_message')}")
    if not parts:
        parts.append("column missing or not evaluable" if column else "not met")
    return ExpectationFailure(config.type, column, "; ".join(parts))


def _short(value, limit: int = 8) -> str:
    if isinstance(value, (list, tuple)):
        items = [v.item() if isinstance(v, np.generic) else v for v in value[:limit]]
        return repr(items) + (" ..." if len(value) > limit else "")
    return repr(value.item() if isinstance(value, np.generic) else value)
