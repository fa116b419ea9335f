"""Decisions carry across retraining rounds: a decision on an example of run R holds for every run
retrained from R (R's descendants through the ``z0inf.parent_run_id`` tag) until someone decides again.

``decisions_in_force`` is pure: the lineage (``[run, parent, grandparent, ...]``, from
``tracking.run_lineage``) and the store's per-run decisions come in; the decisions in force for the
newest run come out. ``inherited_cutoff`` reads the ancestors' review queues for their cut-off.
"""

from __future__ import annotations

import os
from typing import Sequence

import pandas as pd

from ..influence.errors import InfluenceInputError
from .layout import RunLayout
from .policy import INHERITING_METHODS, FlagPolicy
from .queue import read_review_queue
from .store import DECISION_COLUMNS, DecisionStore

LINEAGE_INFO_KEY = "lineage"
CALIBRATED_ON_KEY = "cutoff_fitted_on"


def decisions_in_force(decisions: pd.DataFrame, lineage: Sequence[str]) -> pd.DataFrame:
    """Per example, the most recently recorded decision on any run of ``lineage``, with the run it was
    recorded on as ``decided_on_run``: a later decision, on the run itself or on an ancestor, replaces
    an earlier one, so changing a decision never needs to know which round made it.

    ``decisions``: ``DecisionStore.current_for_runs`` rows (``run_id`` and ``sequence`` columns).
    """
    lineage = list(lineage)
    if not lineage:
        raise InfluenceInputError("decisions_in_force: the lineage holds no run")
    outside = sorted(set(decisions["run_id"]) - set(lineage))
    if outside:
        raise InfluenceInputError(f"decisions_in_force: decisions of run(s) {outside[:3]} outside the lineage")
    latest = decisions.sort_values("sequence", kind="stable").drop_duplicates("example_id", keep="last")
    latest = latest.rename(columns={"run_id": "decided_on_run"}).sort_values("example_id", kind="stable")
    return latest[[*DECISION_COLUMNS, "decided_on_run"]].reset_index(drop=True)


def lineage_of(run_id: str, info: dict) -> list[str]:
    """The lineage a review queue was built for (its metadata), or just the run for older queues."""
    lineage = list(info.get(LINEAGE_INFO_KEY) or [run_id])
    if lineage[0] != run_id:
        raise InfluenceInputError(f"review queue of run {run_id}: its lineage starts at {lineage[0]}")
    return lineage


def lineage_decisions(store: DecisionStore, run_id: str, info: dict) -> pd.DataFrame:
    """The decisions in force for ``run_id``'s review queue, across the lineage recorded in ``info``."""
    lineage = lineage_of(run_id, info)
    return decisions_in_force(store.current_for_runs(lineage), lineage)


def inherited_cutoff(lineage: Sequence[str], policy: FlagPolicy, base: str | os.PathLike) -> tuple[float, str] | None:
    """(cut-off, run it was fitted on) from the nearest ancestor whose review queue was built with the
    same policy, when the policy counts (confident or mixture) and inherits; None otherwise (count afresh).
    ``base``: the outputs base the queues were stored under."""
    if policy.method not in INHERITING_METHODS or not policy.inherit_cutoff:
        return None
    wanted = policy.to_dict()
    for ancestor in list(lineage)[1:]:
        path = RunLayout.for_run(ancestor, base).review_queue
        if not path.is_file():
            continue
        _, info = read_review_queue(path)
        if info.get("policy") == wanted and info.get("cutoff") is not None:
            return float(info["cutoff"]), str(info.get(CALIBRATED_ON_KEY, ancestor))
    return None
