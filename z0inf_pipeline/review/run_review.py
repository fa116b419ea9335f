"""One run's review as the CLI and the review page both see it: its queue, the gate, and decisions
checked against the run before they reach the store (one validation for every way of deciding)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from ..errors import ReviewError
from ..influence.errors import InfluenceInputError
from .gate import GateStatus, evaluate_gate
from .layout import RunLayout, check_run_id, outputs_base
from .lineage import applied_in, lineage_decisions, lineage_of
from .queue import read_review_queue
from .store import DecisionStore, as_example_id


@dataclass
class RunReview:
    """A run's review queue (as the pipeline wrote it) and what a decision on that run may name."""

    layout: RunLayout
    queue: pd.DataFrame
    info: dict

    @classmethod
    def open(cls, run_id: str, base: Path | None = None) -> "RunReview":
        layout = RunLayout.for_run(run_id, base)
        queue, info = read_review_queue(layout.review_queue)
        return cls(layout, queue, info)

    @property
    def run_id(self) -> str:
        return self.layout.run_id

    @property
    def num_classes(self) -> int | None:
        value = self.info.get("num_classes")
        return None if value is None else int(value)

    @cached_property
    def _train_examples(self) -> pd.DataFrame:
        examples = pd.read_parquet(self.layout.examples, columns=["example_id", "split", "label"])
        return examples[examples["split"] == "train"]

    @cached_property
    def training_ids(self) -> np.ndarray:
        return np.sort(self._train_examples["example_id"].to_numpy(np.int64))

    @cached_property
    def label_set(self) -> tuple[str, np.ndarray]:
        """(how it is known, the labels a relabel may name): ``[0, num_classes)`` when the run records
        ``num_classes``, else the labels its training examples carry (runs logged by a team's own
        code, e.g. ``ContractLogger``, often record no class count)."""
        classes = self.num_classes
        if classes:
            return f"the run's classes [0, {classes})", np.arange(classes)
        seen = np.unique(self._train_examples["label"].to_numpy(np.int64))
        shown = seen.tolist() if len(seen) <= 12 else f"{seen[:6].tolist()} ... {seen[-3:].tolist()}"
        return f"the labels seen in the run's training examples {shown}", seen

    def check_decision(self, ids: Iterable[int], action: str, label: int | None) -> None:
        """Refuse ids that are not training examples of the run and labels outside its label set."""
        wanted = np.unique(np.array([as_example_id(i) for i in ids], dtype=np.int64))
        unknown = np.setdiff1d(wanted, self.training_ids)
        if len(unknown):
            raise ReviewError(
                f"review decide: id(s) {unknown[:10].tolist()} are not training examples of run {self.run_id}"
            )
        if action == "relabel" and label is not None:
            where, labels = self.label_set
            if not (labels.min(initial=0) <= int(label) <= labels.max(initial=-1) and np.isin(int(label), labels)):
                raise ReviewError(f"review decide: label {label} is outside {where}")

    def record(
        self,
        store: DecisionStore,
        ids: Iterable[int],
        action: str,
        *,
        label: int | None = None,
        reviewer: str | None = None,
        note: str | None = None,
    ) -> int:
        """Check the decision against the run, then append it to the store (all ids or none)."""
        ids = list(ids)
        self.check_decision(ids, action, label)
        return store.record(self.run_id, ids, action, label=label, reviewer=reviewer, note=note)

    @property
    def lineage(self) -> list[str]:
        """The run, then the run it was retrained from, and so on (as recorded when the queue was built)."""
        return lineage_of(self.run_id, self.info)

    def decisions(self, store: DecisionStore) -> pd.DataFrame:
        """The decisions in force for this run's examples, made on it or on any run of its lineage, with
        ``applied_in``: the retrained run that trained with each one, or None while it is pending."""
        current = lineage_decisions(store, self.run_id, self.info)
        current["applied_in"] = applied_in(current, self.lineage, self.layout.root.parent.parent)
        return current

    def gate(self, current: pd.DataFrame) -> GateStatus:
        """The review gate for the decisions in force (``decisions``)."""
        return evaluate_gate(
            self.queue["example_id"],
            current["example_id"],
            self.info["training_examples"],
            self.info["policy"]["max_unreviewed_fraction"],
        )


def decisions_needed(status: GateStatus) -> int:
    """Decisions the gate needs in all: the flagged examples minus the undecided share it tolerates."""
    tolerated = int(status.max_unreviewed_fraction * status.training_examples + 1e-9)
    return max(0, status.flagged - tolerated)


def _run_folders(base: Path | None = None) -> list[str]:
    """Run ids with an outputs folder under ``<outputs base>/runs/`` (the base ``RunLayout`` uses), by name."""
    runs_dir = outputs_base(base) / "runs"
    if not runs_dir.is_dir():
        return []
    return sorted(p.name for p in runs_dir.iterdir() if p.is_dir() and _is_run_id(p.name))


def runs_with_queue(base: Path | None = None) -> list[str]:
    """Run ids whose review queue has been materialised, by name."""
    return [n for n in _run_folders(base) if RunLayout.for_run(n, base).review_queue.exists()]


def _is_run_id(name: str) -> bool:
    try:
        check_run_id(name)
    except InfluenceInputError:
        return False
    return True


def retrain_parents(base: Path | None = None) -> dict[str, str]:
    """Retrained run id -> the run it was retrained from, as the parents' ``retrained_run`` outputs say."""
    parents: dict[str, str] = {}
    for run_id in _run_folders(base):
        path = RunLayout.for_run(run_id, base).retrained
        if path.exists():
            summary = pd.read_parquet(path, columns=["parent_run_id", "retrained_run_id"])
            parents.update(zip(summary["retrained_run_id"].astype(str), summary["parent_run_id"].astype(str)))
    return parents


def lineage_history(store: DecisionStore, runs: list[str]) -> pd.DataFrame:
    """Every decision recorded on any of ``runs``, with a ``run_id`` column, oldest run first."""
    frames = [store.history(r).assign(run_id=r) for r in reversed(runs)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
