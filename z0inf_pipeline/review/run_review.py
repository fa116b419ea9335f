"""One run under review, as the review page, the review sheet, the CLI and the gate all read it: the
queue the pipeline wrote, what kind of data the run holds, the evidence beside each flagged example,
and decisions checked against the run before they reach the store (one validation for every way of
deciding). Reads run outputs only through ``RunLayout``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from upath import UPath

from ..errors import InputError, ReviewError
from ..influence.loss_tables import step_column, steps_of
from ..influence.signals import SIGNAL_COLUMNS, flag_score
from .evidence import (
    FEATURES_SHOWN,
    Payload,
    clip_text,
    flag_score_standing,
    image_data_uri,
    split_names,
    strongest_effects,
)
from .gate import GateStatus, queue_gate
from .layout import RunLayout, check_run_id
from .lineage import applied_in, lineage_decisions, lineage_of
from .policy import FlagPolicy
from .queue import read_review_queue
from .store import DecisionStore, as_example_id, check_target_text

CLASSIFICATION, TEXT = "classification", "text"
RUN_NAME_KEY = "run_name"  # the MLflow run name, kept in the queue's info when the queue is built


@dataclass
class RunReview:
    """A run's review queue (as the pipeline wrote it, ``info``: policy, cut-off, lineage, run name)
    with everything shown beside each flagged example, and what a decision on the run may name.

    ``kind`` says what the run's examples are: ``"classification"`` (a label among ``class_names``)
    or ``"text"`` (a prompt and a target answer: no classes, so no class filter, and its correction is
    an edited target text instead of a relabel)."""

    layout: RunLayout
    queue: pd.DataFrame
    info: dict
    # The run's recipe (``ContractRun.train_config``): rebuilds its data for pictures and feature rows;
    # without it examples are shown by their text columns, if any.
    train_config: dict | None = None
    # The run's outputs already in memory (the Dagster asset has them as inputs), by RunLayout
    # property name; anything not given is read through ``layout``.
    frames: dict[str, pd.DataFrame | None] = field(default_factory=dict, repr=False)
    _payloads: dict[int, Payload] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, run_id: str, base: Path, train_config: dict | None = None) -> "RunReview":
        layout = RunLayout.for_run(run_id, base)
        queue, info = read_review_queue(layout.review_queue)
        return cls(layout, queue, info, train_config)

    @property
    def run_id(self) -> str:
        return self.layout.run_id

    def out_of_date(self) -> str | None:
        """Why this queue is not the latest attempt's, or None: a ``review_queue`` materialisation started
        after it was stored and has not stored its own (it failed, or is still running). Read on every
        call: the attempt record comes and goes while the queue file stays."""
        try:
            attempt = json.loads(self.layout.review_queue_attempt.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            attempt = {}
        return (f"out of date: the last review_queue run (Dagster run {attempt.get('dagster_run_id', 'unknown')}) "
                "failed or has not finished; this queue is from an earlier run. Look at that run in the Dagster UI "
                f"and materialise review_queue again: z0inf materialize influence --run {self.run_id}")

    @property
    def run_name(self) -> str:
        """The MLflow run name people know the run by (the id's first 8 characters for queues built before
        names were kept)."""
        return str(self.info.get(RUN_NAME_KEY) or self.run_id[:8])

    # --- what the run is ---------------------------------------------------------------------------

    @cached_property
    def kind(self) -> str:
        """``"text"`` when the examples carry a target text (a sequence task), else ``"classification"``."""
        return TEXT if "target" in self.examples.columns else CLASSIFICATION

    @property
    def is_text(self) -> bool:
        return self.kind == TEXT

    @cached_property
    def class_names(self) -> tuple[str, ...]:
        """The name of each class, by index (the CSV's label values, a built-in dataset's names, else the
        index itself); none for a text run."""
        if self.is_text:
            return ()
        classes = self.info.get("num_classes")
        if classes is None:
            classes = int(self.examples["label"].max()) + 1
        names = self._bundle.class_names if self._bundle is not None else ()
        return tuple(names) if len(names) == classes else tuple(str(c) for c in range(classes))

    def label_name(self, label) -> str:
        """A class index as people read it: its name where the run has one."""
        if label is None or pd.isna(label):
            return ""
        label = int(label)
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

    def label_index(self, value: str | int | None) -> int | None:
        """A class given by name (``versicolor``) or index (``1``) as its index; a named error otherwise."""
        if value is None:
            return None
        text = str(value).strip()
        if text in self.class_names:
            return self.class_names.index(text)
        try:
            return int(text)
        except ValueError:
            raise ReviewError(
                f"review decide: label {text!r} is neither a class of run {self.run_id} "
                f"({', '.join(self.class_names) or 'a text run has none'}) nor a class index"
            ) from None

    @cached_property
    def allowed_labels(self) -> tuple[int, ...]:
        """The labels a relabel may name: the run's classes ``0 .. num_classes-1`` where it records
        ``num_classes``, else (a ``ContractLogger`` run) the labels its examples carry, no others: a
        label no example has is more likely a typo than a class."""
        if self.is_text:
            return ()
        if self.info.get("num_classes") is not None:
            return tuple(range(int(self.info["num_classes"])))
        return tuple(int(v) for v in np.unique(self.examples["label"].dropna().to_numpy(np.int64)))

    @property
    def allowed_labels_source(self) -> str:
        if self.info.get("num_classes") is not None:
            return f"num_classes={self.info['num_classes']}"
        return "the run records no num_classes: the labels its examples carry"

    # --- deciding ----------------------------------------------------------------------------------

    @cached_property
    def training_ids(self) -> np.ndarray:
        examples = self.examples
        return np.sort(examples.index[examples["split"] == "train"].to_numpy(np.int64))

    def check_decision(self, ids: Iterable[int], action: str, label: int | None, target_text: str | None = None) -> None:
        """Refuse ids that are not training examples of the run, labels outside its classes, a relabel
        on a text run (it has no class to relabel to: its target text is edited instead), a target
        edit on a classification run, and a target text the run's recipe cannot train on."""
        wanted = np.unique(np.array([as_example_id(i) for i in ids], dtype=np.int64))
        unknown = np.setdiff1d(wanted, self.training_ids)
        if len(unknown):
            raise ReviewError(
                f"review decide: id(s) {unknown[:10].tolist()} are not training examples of run {self.run_id}"
            )
        if action == "relabel" and self.is_text:
            raise ReviewError(
                f"review decide: run {self.run_id} is a text run: its answers have no class to relabel to "
                "(edit the target text with --action edit_target --target TEXT, drop a wrong answer, or keep it)"
            )
        if action == "edit_target":
            self._check_target_text(target_text)
        allowed = self.allowed_labels
        if action == "relabel" and label is not None and int(label) not in allowed:
            shown = ", ".join(str(a) for a in allowed[:50]) + (", ..." if len(allowed) > 50 else "")
            raise ReviewError(
                f"review decide: label {label} is outside the run's label set {{{shown}}} "
                f"({self.allowed_labels_source})"
            )

    def record(
        self,
        store: DecisionStore,
        ids: Iterable[int],
        action: str,
        *,
        label: int | None = None,
        target_text: str | None = None,
        reviewer: str | None = None,
        note: str | None = None,
    ) -> int:
        """Check the decision against the run, then append it to the store (all ids or none)."""
        ids = list(ids)
        self.check_decision(ids, action, label, target_text)
        return store.record(self.run_id, ids, action, label=label, target_text=target_text, reviewer=reviewer,
                            note=note)

    def _check_target_text(self, text: str | None) -> None:
        """An edited target answer: only on a text run, and one its recipe can train on (the LM recipe's
        letters and length) where the run's recipe is known."""
        if not self.is_text:
            raise ReviewError(
                f"review decide: run {self.run_id} is a classification run: it has class labels, not target "
                "texts (relabel with --action relabel --label CLASS)"
            )
        text = check_target_text(text)
        if (self.train_config or {}).get("recipe") == "lm":  # training.lm.RECIPE, named without importing torch
            from ..training.lm import LMRecipe  # torch: only for a run of the LM recipe

            if problem := LMRecipe.from_dict(self.train_config).target_text_problem(text):
                raise ReviewError(f"review decide: run {self.run_id}: {problem}")

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

    def gate(self, current: pd.DataFrame | None = None, store: DecisionStore | None = None) -> GateStatus:
        """The review gate for the decisions in force: ``current`` (``decisions``), else asked of ``store``."""
        return queue_gate(self.queue, self.info, self.decisions(store) if current is None else current)

    @cached_property
    def policy(self) -> FlagPolicy:
        """The flag policy the queue was built with."""
        return FlagPolicy.from_dict(self.info["policy"])

    # --- the run's outputs -------------------------------------------------------------------------

    def _output(self, name: str) -> pd.DataFrame | None:
        """One of the run's outputs (a RunLayout property name): given in ``frames``, else read; None when
        the run has none (no predictions for runs whose data cannot be rebuilt)."""
        if name in self.frames:
            return self.frames[name]
        path = getattr(self.layout, name)
        return pd.read_parquet(path) if path.exists() else None

    @cached_property
    def examples(self) -> pd.DataFrame:
        return self._output("examples").set_index("example_id")

    @cached_property
    def predictions(self) -> pd.DataFrame | None:
        frame = self._output("predictions")
        return None if frame is None else frame.set_index("example_id")

    @cached_property
    def topk(self) -> pd.DataFrame | None:
        return self._output("topk")

    @cached_property
    def all_scores(self) -> pd.DataFrame | None:
        """Per-example scores of every training example (ranks are taken among all of them)."""
        frame = self._output("self_influence")
        return None if frame is None else frame.set_index("example_id")

    # --- the evidence beside each example ----------------------------------------------------------

    @cached_property
    def signal_columns(self) -> list[str]:
        """The signals of ``influence.signals`` that this run defines (confidence and variability are
        undefined for a loss that is not cross-entropy)."""
        return [c for c in SIGNAL_COLUMNS if c in self.queue.columns and self.queue[c].notna().any()]

    @cached_property
    def signal_ranks(self) -> pd.DataFrame:
        """(value, rank, out of) per defined signal for every queued id: the rank among all training
        examples that the queue carries (``<signal>_rank``, 1 = most suspicious)."""
        queue = self.queue.set_index("example_id")
        total = int(self.info.get("training_examples", len(queue)))
        columns = {}
        for name in self.signal_columns:
            columns[(name, "value")] = queue[name]
            columns[(name, "rank")] = queue[f"{name}_rank"]
            columns[(name, "of")] = total
        return pd.DataFrame(columns, index=queue.index)

    @cached_property
    def flag_standing(self) -> pd.DataFrame:
        """Per queued id: its flag score, the score's percentile among all training examples and its
        rank among them (1 = highest); percentile and rank are missing without the run's score file."""
        queue = self.queue.set_index("example_id")
        standing = pd.DataFrame({"score": queue["flag_score"], "percentile": np.nan, "rank": np.nan}, index=queue.index)
        if self.all_scores is not None:
            everyone = flag_score(self.all_scores, self.policy.score)
            standing["percentile"], standing["rank"] = flag_score_standing(standing["score"], everyone)
        return standing

    def flagged_by(self, example_id: int) -> tuple[str, ...]:
        """The signals that flag the example on their own under the run's policy (``flagged_by``)."""
        return split_names(self.queue.set_index("example_id").at[example_id, "flagged_by"])

    @cached_property
    def flag_signal_names(self) -> tuple[str, ...]:
        """The signals that flag at least one queued example on their own, in ``SIGNAL_COLUMNS`` order."""
        named = {n for value in self.queue["flagged_by"] for n in split_names(value)}
        return tuple(c for c in SIGNAL_COLUMNS if c in named)

    def effects(self, example_ids) -> dict[int, tuple[pd.DataFrame, pd.DataFrame]]:
        """For each training id: (test examples it helps most, test examples it hurts most), best first,
        from the train-test top-k table (where the id is among a test example's proponents or opponents)."""
        ids = np.asarray(list(example_ids), dtype=np.int64)
        empty = pd.DataFrame(columns=["test_example_id", "score"])
        if self.topk is None:
            return {int(i): (empty, empty) for i in ids}
        top = self.topk
        helps = strongest_effects(top, "proponent_id", "proponent_score", ids, ascending=False)
        hurts = strongest_effects(top, "opponent_id", "opponent_score", ids, ascending=True)
        return {int(i): (helps.get(int(i), empty), hurts.get(int(i), empty)) for i in ids}

    @cached_property
    def effects_note(self) -> str:
        """Why a card may name no test example it helps or hurts: each test example keeps only its top-k
        proponents and opponents, so most training examples are in no test example's list."""
        if self.topk is None:
            return "no train-test influence for this run yet"
        k = int(self.topk["rank"].max()) if len(self.topk) else 0
        return f"among no test example's top {k} (each test example keeps its {k} strongest)"

    def wrong_tests(self) -> pd.DataFrame | None:
        """Test examples the model gets wrong, most confidently wrong first: a prediction other than the
        label, or (text runs) an answer other than the target; None when the run recorded no per-example
        predictions, so which ones are wrong is not known."""
        if self.predictions is None:
            return None
        test = self.predictions[self.predictions["split"] == "test"]
        wrong = ~test["correct"].astype(bool) if "correct" in test else test["predicted_label"] != test["label"]
        return test[wrong].reset_index().sort_values("confidence", ascending=False, kind="stable").reset_index(drop=True)

    @property
    def test_count(self) -> int:
        return int((self.examples["split"] == "test").sum())

    def neighbours(self, test_id: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(proponents, opponents) of one test example: training id and score, strongest first."""
        if self.topk is None:
            raise InputError(f"run {self.run_id}: has no train-test top-k table yet")
        rows = self.topk[self.topk["test_example_id"] == int(test_id)].sort_values("rank")
        if rows.empty:
            raise InputError(f"run {self.run_id}: {test_id} is not a test example with influence scores")
        proponents = rows[["proponent_id", "proponent_score"]].set_axis(["example_id", "score"], axis=1)
        opponents = rows[["opponent_id", "opponent_score"]].set_axis(["example_id", "score"], axis=1)
        return proponents.reset_index(drop=True), opponents.reset_index(drop=True)

    def loss_trajectories(self, example_ids, split: str = "train") -> dict[int, np.ndarray]:
        table = self._output("train_losses" if split == "train" else "test_losses").set_index("example_id")
        columns = [step_column(s) for s in steps_of(table.columns)]
        ids = [int(i) for i in example_ids]
        values = table.reindex(ids)[columns].to_numpy(np.float64)
        return dict(zip(ids, values))

    def payloads(self, example_ids) -> dict[int, Payload]:
        """How each example looks (computed once per id): a picture, its text or its feature row."""
        ids = [int(i) for i in example_ids]
        missing = [i for i in ids if i not in self._payloads]
        if missing:
            self._payloads.update(self._build_payloads(missing))
        return {i: self._payloads[i] for i in ids if i in self._payloads}

    def _build_payloads(self, ids: list[int]) -> dict[int, Payload]:
        # a text run's target is shown as its label, beside the prediction: the payload is the rest
        shown_as_label = {"split", "target"} if self.is_text else {"split"}
        text_columns = [
            c for c in self.examples.columns
            if c not in shown_as_label and pd.api.types.is_string_dtype(self.examples[c])
        ]
        if text_columns:
            rows = self.examples.reindex(ids)[text_columns]
            return {
                i: Payload("text", text=clip_text("\n".join(f"{c}: {v}" for c, v in row.items() if pd.notna(v))))
                for i, row in zip(ids, rows.to_dict("records"))
            }
        bundle = self._bundle
        if bundle is None:
            return {}
        all_ids = np.concatenate([bundle.train.example_ids, bundle.test.example_ids])
        features = np.concatenate([bundle.train.features.numpy(), bundle.test.features.numpy()])
        positions = pd.Index(all_ids).get_indexer(ids)
        found = [(i, p) for i, p in zip(ids, positions) if p >= 0]
        if self._is_image:
            return {i: Payload("image", image=image_data_uri(features[p])) for i, p in found}
        names = bundle.feature_names or tuple(f"x{j}" for j in range(features.shape[1]))
        return {
            i: Payload(
                "features",
                features=tuple(
                    (name, f"{v:.3g}") for name, v in zip(names[:FEATURES_SHOWN], features[p].reshape(-1)[:FEATURES_SHOWN])
                ),
            )
            for i, p in found
        }

    @cached_property
    def _is_image(self) -> bool:
        return self._bundle is not None and len(self._bundle.input_shape) == 3

    @cached_property
    def _bundle(self):
        """The run's data rebuilt from its recipe (as images when the dataset has them); None when it cannot be."""
        if self.train_config is None:
            return None
        from ..training import TrainConfig, load_dataset

        try:
            config = TrainConfig.from_dict(self.train_config)
        except InputError:  # another recipe (the LM recipe): its examples are shown by their text
            return None
        options = dict(seed=config.seed, test_fraction=config.test_fraction, label_column=config.label_column)
        for image in (True, False):
            try:
                return load_dataset(config.dataset, image=image, **options)
            except InputError:
                continue
        return None


def decisions_needed(status: GateStatus) -> int:
    """Decisions the gate needs in all: the flagged examples minus the undecided share it tolerates."""
    tolerated = int(status.max_unreviewed_fraction * status.training_examples + 1e-9)
    return max(0, status.flagged - tolerated)


def _run_folders(base: Path) -> list[str]:
    """Run ids with an outputs folder under ``<outputs base>/runs/`` (the base ``RunLayout`` uses), by name."""
    runs_dir = UPath(base) / "runs"
    if not runs_dir.is_dir():
        return []
    return sorted(p.name for p in runs_dir.iterdir() if p.is_dir() and _is_run_id(p.name))


def runs_with_queue(base: Path) -> list[str]:
    """Run ids whose review queue has been materialised, by name."""
    return [n for n in _run_folders(base) if RunLayout.for_run(n, base).review_queue.exists()]


def _is_run_id(name: str) -> bool:
    try:
        check_run_id(name)
    except InputError:
        return False
    return True


def lineage_history(store: DecisionStore, runs: list[str]) -> pd.DataFrame:
    """Every decision recorded on any of ``runs``, with a ``run_id`` column, oldest run first."""
    frames = [store.history(r).assign(run_id=r) for r in reversed(runs)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
