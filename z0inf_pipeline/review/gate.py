"""The review gate: retraining waits until (almost) every flagged example has a human decision.

The gate's policy belongs to the review, not to the retrain: it is fixed when a run's queue is built,
and ``policy_changes`` refuses a rebuild that changes it unless a reviewer is named (never inside a
retrain), and records every change with the queue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable

import numpy as np
import pandas as pd

from ..errors import ReviewError
from .policy import FlagPolicy

POLICY_CHANGES_KEY = "policy_changes"


@dataclass(frozen=True)
class GateStatus:
    """Flagged examples without a decision, as a share of the training set, against the allowed maximum."""

    flagged: int
    unreviewed: int
    training_examples: int
    max_unreviewed_fraction: float
    unreviewed_ids: tuple[int, ...]

    @property
    def reviewed(self) -> int:
        return self.flagged - self.unreviewed

    @property
    def unreviewed_fraction(self) -> float:
        return self.unreviewed / self.training_examples if self.training_examples else 0.0

    @property
    def passed(self) -> bool:
        return self.unreviewed_fraction <= self.max_unreviewed_fraction

    def message(self) -> str:
        verdict = "open" if self.passed else "BLOCKED"
        return (
            f"review gate {verdict}: {self.unreviewed} of {self.flagged} flagged examples have no decision "
            f"({self.unreviewed_fraction:.2%} of {self.training_examples} training examples; "
            f"at most {self.max_unreviewed_fraction:.2%} may stay unreviewed)"
        )


def evaluate_gate(
    flagged_ids: Iterable[int], decided_ids: Iterable[int], training_examples: int, max_unreviewed_fraction: float
) -> GateStatus:
    flagged = np.unique(np.fromiter((int(i) for i in flagged_ids), dtype=np.int64))
    decided = np.fromiter((int(i) for i in decided_ids), dtype=np.int64)
    unreviewed = np.setdiff1d(flagged, decided)
    return GateStatus(
        flagged=len(flagged),
        unreviewed=len(unreviewed),
        training_examples=int(training_examples),
        max_unreviewed_fraction=float(max_unreviewed_fraction),
        unreviewed_ids=tuple(int(i) for i in unreviewed),
    )


def queue_gate(queue: pd.DataFrame, info: dict, current: pd.DataFrame) -> GateStatus:
    """The gate of a review queue (``read_review_queue``'s frame and info) for the decisions in force
    (``lineage_decisions``): the one reading of the queue that the check, the CLI and the page share."""
    policy = FlagPolicy.from_dict(info["policy"])
    return evaluate_gate(
        queue["example_id"], current["example_id"], info["training_examples"], policy.max_unreviewed_fraction
    )


def _plain(policy: dict) -> dict:
    return json.loads(json.dumps(policy, sort_keys=True))


def policy_changes(
    run_id: str, previous: dict | None, wanted: dict, *, changed_by: str | None, retraining: bool
) -> list[dict]:
    """The record of policy changes to store with a rebuilt queue of ``run_id``.

    ``previous``: the info of the queue built before (None: the first build, any policy goes);
    ``wanted``: the policy asked for now. The same policy keeps the record; another one is refused
    inside a job that retrains (a retrain cannot open its own gate) and without ``changed_by`` (a reviewer's
    name), else appended to the record as who changed what, when.
    """
    if previous is None:
        return []
    changes = list(previous.get(POLICY_CHANGES_KEY) or [])
    before = _plain(previous.get("policy") or {})
    after = _plain(wanted)
    if before == after:
        return changes
    differs = {k: (before.get(k), after.get(k)) for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}
    shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in differs.items())
    rebuild = f"z0inf materialize influence --run {run_id} --policy-changed-by NAME <policy flags>"
    if retraining:
        raise ReviewError(
            f"review queue of run {run_id}: a retrain cannot change the flag policy its queue was built with "
            f"({shown}); the gate's policy belongs to the review. To change it, rebuild the queue: {rebuild}"
        )
    if not (changed_by or "").strip():
        raise ReviewError(
            f"review queue of run {run_id}: rebuilding it with another flag policy ({shown}) changes its gate, "
            f"which is a reviewer's act: name yourself, {rebuild}"
        )
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return [*changes, {"by": changed_by.strip(), "at": stamp, "from": before, "to": after, "changed": shown}]
