"""Decisions carry across retraining rounds: a decision on an example of run R holds for every run
retrained from R (R's descendants through the ``z0inf.parent_run_id`` tag) until someone decides again.

``decisions_in_force`` is pure: the lineage (``[run, parent, grandparent, ...]``, from
``tracking.run_lineage``) and the store's per-run decisions come in; the decisions in force for the
newest run come out. ``lineage_decisions`` is the one way every reader (curation, both curation
checks, the gate, the page, the CLI) asks the store what a lineage decided.

When a decision takes effect: a retrain reads the store once, up to its high-water mark (recorded
with the curated set, the retrained summary and the child's MLflow run as ``decisions_through``).
Every decision up to the mark is applied to that retrain; a later one stays in force for the
retrained run and is applied when it is retrained in turn. ``applied_in`` says which, per decision.
``inherited_cutoff`` reads the ancestors' review queues for their cut-off.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from .layout import RunLayout
from .policy import INHERITING_METHODS, FlagPolicy
from .queue import read_review_queue
from .store import DECISION_COLUMNS, DecisionStore

LINEAGE_INFO_KEY = "lineage"
CALIBRATED_ON_KEY = "cutoff_fitted_on"
# The store's high-water mark a retrain applied: in the curated set's attrs and the retrained summary.
DECISIONS_THROUGH = "decisions_through"


def decisions_in_force(decisions: pd.DataFrame, lineage: Sequence[str]) -> pd.DataFrame:
    """Per example, the most recently recorded decision on any run of ``lineage``, with the run it was
    recorded on as ``decided_on_run``: a later decision, on the run itself or on an ancestor, replaces
    an earlier one, so changing a decision never needs to know which round made it.

    ``decisions``: ``DecisionStore.current_for_runs`` rows (``run_id`` and ``sequence`` columns);
    ``sequence`` stays, so a reader can tell which decisions a retrain's snapshot held.
    """
    lineage = list(lineage)
    if not lineage:
        raise InputError("decisions_in_force: the lineage holds no run")
    outside = sorted(set(decisions["run_id"]) - set(lineage))
    if outside:
        raise InputError(f"decisions_in_force: decisions of run(s) {outside[:3]} outside the lineage")
    latest = decisions.sort_values("sequence", kind="stable").drop_duplicates("example_id", keep="last")
    latest = latest.rename(columns={"run_id": "decided_on_run"}).sort_values("example_id", kind="stable")
    return latest[[*DECISION_COLUMNS, "decided_on_run", "sequence"]].reset_index(drop=True)


def lineage_of(run_id: str, info: dict) -> list[str]:
    """The lineage a review queue was built for (its metadata), or just the run for older queues."""
    lineage = list(info.get(LINEAGE_INFO_KEY) or [run_id])
    if lineage[0] != run_id:
        raise InputError(f"review queue of run {run_id}: its lineage starts at {lineage[0]}")
    return lineage


def lineage_decisions(store: DecisionStore, run_id: str, info: dict, *, through: int | None = None) -> pd.DataFrame:
    """The decisions in force for ``run_id``'s review queue, across the lineage recorded in ``info``:
    its own and its ancestors', the latest per example. ``through``: only those recorded up to this
    high-water mark (``DecisionStore.high_water_mark``), as a retrain's snapshot saw them."""
    lineage = lineage_of(run_id, info)
    return decisions_in_force(store.current_for_runs(lineage, through=through), lineage)


def retrain_snapshot(layout: RunLayout) -> tuple[str, int] | None:
    """(retrained run id, the high-water mark its curation applied) from ``layout``'s retrained
    summary; None when the run was not retrained (or by a version that recorded no mark)."""
    path = layout.retrained
    if not path.exists():
        return None
    with path.open("rb") as handle:
        summary = pd.read_parquet(handle)
    if DECISIONS_THROUGH not in summary.columns or summary.empty:
        return None
    return str(summary.at[0, "retrained_run_id"]), int(summary.at[0, DECISIONS_THROUGH])


def applied_in(current: pd.DataFrame, lineage: Sequence[str], base: str | os.PathLike) -> pd.Series:
    """Per decision in force (``lineage_decisions`` rows), the retrained run that trained with it, or
    None while it is pending (it takes effect at the lineage's next retrain).

    A decision made on run A is applied in the retrain of A or of any run later in the lineage whose
    snapshot (``decisions_through``) was taken after it was recorded; the oldest such retrain is named.
    """
    lineage = list(lineage)
    applied = pd.Series([None] * len(current), index=current.index, dtype=object)
    if current.empty:
        return applied
    position = {run: k for k, run in enumerate(lineage)}
    decided_at = current["decided_on_run"].map(position).to_numpy(np.int64)
    sequence = current["sequence"].to_numpy(np.int64)
    # From the oldest retrain to the newest: the first snapshot that holds a decision applied it.
    for k in range(len(lineage) - 1, -1, -1):
        snapshot = retrain_snapshot(RunLayout.for_run(lineage[k], base))
        if snapshot is None:
            continue
        child, through = snapshot
        if k > 0 and child != lineage[k - 1]:
            continue  # a retrain of this run that is not the one this lineage descends from
        holds = (decided_at >= k) & (sequence <= through) & applied.isna().to_numpy()
        applied[holds] = child
    return applied


def inherited_cutoff(lineage: Sequence[str], policy: FlagPolicy, base: str | os.PathLike) -> tuple[float, str] | None:
    """(cut-off, run it was fitted on) from the nearest ancestor whose review queue was built with the
    same policy, when the policy counts (confident or mixture) and inherits; None otherwise (count afresh).
    ``base``: the outputs base the queues were stored under."""
    if policy.method not in INHERITING_METHODS or not policy.inherit_cutoff:
        return None
    for ancestor in list(lineage)[1:]:
        path = RunLayout.for_run(ancestor, base).review_queue
        if not path.is_file():
            continue
        _, info = read_review_queue(path)
        if "policy" in info and FlagPolicy.from_dict(info["policy"]) == policy and info.get("cutoff") is not None:
            return float(info["cutoff"]), str(info.get(CALIBRATED_ON_KEY, ancestor))
    return None
