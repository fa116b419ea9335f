"""Curation: the training set as reviewed (drops removed, relabels and target edits applied) and the
recipe to retrain on it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import InputError


@dataclass(frozen=True)
class CuratedSet:
    """``frame``: example_id, label (after relabels), observed_label (as trained), action (or None),
    target_text (a text example's new target answer where a reviewer edited it, else None)."""

    frame: pd.DataFrame
    dropped_ids: tuple[int, ...]
    relabels: dict[int, int]
    target_edits: dict[int, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.frame)


def relabels_of(frame: pd.DataFrame) -> dict[int, int]:
    """``{example_id: new label}`` of the rows whose ``action`` is relabel (decisions or a curated set)."""
    rows = frame[frame["action"] == "relabel"]
    return {int(i): int(y) for i, y in zip(rows["example_id"], rows["label"])}


def target_edits_of(frame: pd.DataFrame) -> dict[int, str]:
    """``{example_id: new target text}`` of the rows whose ``action`` is edit_target (decisions or a
    curated set; a curated set written before target edits existed has none)."""
    if "target_text" not in frame:
        return {}
    rows = frame[frame["action"] == "edit_target"]
    return {int(i): str(t) for i, t in zip(rows["example_id"], rows["target_text"])}


def curate(
    train_examples: pd.DataFrame, decisions: pd.DataFrame, num_classes: int | None = None, *, run_id: str | None = None
) -> CuratedSet:
    """Apply the decisions in force to the run's training examples. Decisions made on ``run_id`` must
    name its training ids; one inherited from an ancestor (``decided_on_run``) on an id the run does
    not train on was applied by the retrain that left it out, and is skipped here."""
    ids = train_examples["example_id"].to_numpy(np.int64)
    if run_id is not None and "decided_on_run" in decisions:
        inherited = decisions["decided_on_run"] != run_id
        decisions = decisions[~(inherited & ~decisions["example_id"].isin(ids))]
    unknown = np.setdiff1d(decisions["example_id"].to_numpy(np.int64), ids)
    if len(unknown):
        raise InputError(
            f"curation: {len(unknown)} decision(s) name ids that are not training examples of the run, "
            f"e.g. {unknown[:5].tolist()}"
        )
    by_action = decisions.groupby("action")["example_id"]
    dropped = tuple(sorted(int(i) for i in by_action.get_group("drop"))) if "drop" in by_action.groups else ()
    relabels = relabels_of(decisions)
    if num_classes is not None:
        bad = {i: y for i, y in relabels.items() if not 0 <= y < num_classes}
        where = f"the {num_classes} classes [0, {num_classes})"
    else:  # no class count recorded: the labels the run trains on
        seen = set(train_examples["label"].astype(int))
        bad = {i: y for i, y in relabels.items() if y not in seen}
        where = "the labels seen in the run's training examples"
    if bad:
        raise InputError(f"curation: relabels {bad} are outside {where}")

    frame = pd.DataFrame({"example_id": ids, "observed_label": train_examples["label"].to_numpy(np.int64)})
    action = decisions.set_index("example_id")["action"].reindex(ids)
    frame["action"] = action.to_numpy()
    frame = frame[~np.isin(ids, dropped)].reset_index(drop=True)
    new = pd.Series(relabels, dtype="int64").reindex(frame["example_id"])
    frame.insert(1, "label", np.where(new.notna(), new.fillna(-1).astype(np.int64), frame["observed_label"]))
    edits = target_edits_of(decisions)
    frame["target_text"] = pd.Series(edits, dtype=object).reindex(frame["example_id"]).to_numpy()
    return CuratedSet(frame, dropped, relabels, {i: t for i, t in edits.items() if i not in set(dropped)})


def retrain_config(parent, curated: CuratedSet):
    """The parent's recipe with the curated exclusions, relabels and target edits added (earlier
    curation rounds kept). Target edits need a recipe that trains on target texts (``target_edits``)."""
    excluded = sorted(set(parent.exclude_ids) | set(curated.dropped_ids))
    relabels = dict(parent.relabels)
    relabels.update(curated.relabels)
    relabels = {i: y for i, y in relabels.items() if i not in set(excluded)}
    changes = {"exclude_ids": tuple(excluded), "relabels": tuple(sorted(relabels.items()))}
    if "target_edits" in type(parent).model_fields:
        edits = dict(parent.target_edits)
        edits.update(curated.target_edits)
        changes["target_edits"] = tuple(sorted((i, t) for i, t in edits.items() if i not in set(excluded)))
    elif curated.target_edits:
        raise InputError(
            f"curation: {len(curated.target_edits)} target edit(s), e.g. example {min(curated.target_edits)}, but "
            f"the run's recipe ({type(parent).__name__}) trains on class labels, not target texts"
        )
    return parent.replace(**changes)
