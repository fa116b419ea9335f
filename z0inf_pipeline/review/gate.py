"""The review gate: retraining waits until (almost) every flagged example has a human decision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd

from .policy import FlagPolicy


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
