"""Review cards: one flagged (or influential) training example with its evidence and its decisions,
as plain dicts that the review page and the review sheet render with the same template macros."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..influence.signals import signal
from .evidence import short_number, sparkline
from .run_review import RunReview


# How far to trust "helps most" / "hurts most": the default train-test method and its suite-mean LDS
# against TracInCP's, from benchmarks/README.md ("Train-test attribution"); updated with the suite.
ATTRIBUTION_ACCURACY = {"method": "Z0-Inf along 256 random directions", "lds": "0.463", "tracincp": "0.462",
                        "table": "/accuracy"}


def decision_effect(applied_in) -> str:
    """When a decision in force takes effect (``RunReview.decisions``'s ``applied_in``): never 'applied'
    unless a retrain's snapshot held it."""
    if isinstance(applied_in, str):
        return f"applied in retrained run {applied_in[:8]}"
    return "pending: takes effect at the next retrain"


def decision_text(action, label, class_names: tuple[str, ...] = (), target_text=None) -> str:
    """'drop', 'keep' or 'relabel → 4', by the class's name where the run has one ('relabel → versicolor');
    a text run's edit as 'target → “bcdef”'; '' when there is no decision."""
    if action is None or pd.isna(action):
        return ""
    if action == "edit_target":
        return f"target → “{target_text}”"
    if action != "relabel" or pd.isna(label):
        return str(action)
    label = int(label)
    return f"relabel → {class_names[label] if 0 <= label < len(class_names) else label}"


def training_cards(
    review: RunReview,
    example_ids,
    current: pd.DataFrame,
    history: pd.DataFrame | None = None,
    scores: dict[int, float] | None = None,
) -> list[dict]:
    """Cards for training examples, in the order given.

    ``current``: the decisions in force for the run (``review.decisions``, with ``decided_on_run``
    when a decision was made on an earlier run of the lineage); ``history``: every
    decision on the run and the runs it was retrained from (``run_id`` plus the store's columns),
    oldest first; ``scores``: an influence score to show on each card (the test-example view).
    """
    ids = [int(i) for i in example_ids]
    queue = review.queue.set_index("example_id")
    ranks = review.signal_ranks
    standing = review.flag_standing
    total = int(review.info.get("training_examples", len(review.examples)))
    losses = review.loss_trajectories(ids)
    payloads = review.payloads(ids)
    effects = review.effects(ids)
    test_ids = {int(t) for helps, hurts in effects.values() for t in (*helps["test_example_id"], *hurts["test_example_id"])}
    test_cards = {c["id"]: c for c in test_example_cards(review, sorted(test_ids))}
    decided = current.set_index("example_id")
    by_example = {} if history is None or history.empty else dict(tuple(history.groupby("example_id")))

    cards = []
    for i in ids:
        trajectory = losses.get(i, np.array([]))
        decision = decided.loc[i] if i in decided.index else None
        helps, hurts = effects[i]
        cards.append(
            {
                "id": i,
                "in_queue": i in queue.index,
                "rank": int(queue.at[i, "rank"]) if i in queue.index else None,
                "flag": _flag(standing, i, total, review.policy.score),
                **_label_and_prediction(review, i, queue),
                "signals": _signals(ranks, i),
                "flagged_by": review.flagged_by(i) if i in queue.index else (),
                "score": None if scores is None else short_number(scores.get(i)),
                "spark": sparkline(trajectory),
                "loss_first": short_number(trajectory[0]) if len(trajectory) else "",
                "loss_last": short_number(trajectory[-1]) if len(trajectory) else "",
                "payload": payloads.get(i),
                "helps": [dict(test_cards[int(t)], score=short_number(s)) for t, s in helps.itertuples(index=False)],
                "hurts": [dict(test_cards[int(t)], score=short_number(s)) for t, s in hurts.itertuples(index=False)],
                "decision": None if decision is None else _decision(decision, review),
                "history": [] if i not in by_example else _history(by_example[i], review),
            }
        )
    return cards


def test_example_cards(review: RunReview, example_ids) -> list[dict]:
    """Small cards for test examples: picture or prompt, label (or target answer) and prediction."""
    ids = [int(i) for i in example_ids]
    payloads = review.payloads(ids)
    cards = []
    for i in ids:
        shown = _label_and_prediction(review, i)
        cards.append({"id": i, **shown, "wrong": shown["disagrees"], "payload": payloads.get(i)})
    return cards


def _label_and_prediction(review: RunReview, example_id: int, queue: pd.DataFrame | None = None) -> dict:
    """Label and prediction by the same names: class names for a classification run (``label`` and
    ``predicted`` keep the indices the forms need), the target and the model's answer for a text run.
    The probability is the queue's ``predicted_probability`` for a flagged example, else the predictions
    file's (where that column is still called ``confidence``; the queue's ``confidence`` is the
    data-map signal)."""
    examples, predictions = review.examples, review.predictions
    known = example_id in examples.index
    if review.is_text:
        target = examples.at[example_id, "target"] if known else None
        row = predictions.loc[example_id] if predictions is not None and example_id in predictions.index else None
        answer = None if row is None or "predicted_text" not in row else row["predicted_text"]
        return {
            "label": None,
            "label_name": "" if target is None or pd.isna(target) else str(target),
            "predicted": answer,
            "predicted_name": "" if answer is None or pd.isna(answer) else str(answer),
            "probability": "" if row is None else _probability(row["confidence"]),
            "disagrees": row is not None and "correct" in row and not bool(row["correct"]),
        }
    label = int(examples.at[example_id, "label"]) if known else None
    predicted, probability = None, ""
    if queue is not None and example_id in queue.index and pd.notna(queue.at[example_id, "predicted_label"]):
        row = queue.loc[example_id]
        predicted, probability = int(row["predicted_label"]), _probability(row["predicted_probability"])
    elif predictions is not None and example_id in predictions.index:
        row = predictions.loc[example_id]
        predicted, probability = int(row["predicted_label"]), _probability(row["confidence"])
    return {
        "label": label,
        "label_name": review.label_name(label),
        "predicted": predicted,
        "predicted_name": review.label_name(predicted),
        "probability": probability,
        "disagrees": predicted is not None and label is not None and predicted != label,
    }


def _probability(value) -> str:
    """Three decimals, so that 0.9996 reads 1.000 and not a certainty of 1."""
    return "" if pd.isna(value) else f"{float(value):.3f}"


def _flag(standing: pd.DataFrame, example_id: int, total: int, score_name: str) -> dict | None:
    """The flag score of a queued example with its percentile and rank among all training examples."""
    if example_id not in standing.index:
        return None
    row = standing.loc[example_id]
    return {
        "name": score_name,
        "score": short_number(row["score"]),
        "percentile": "" if pd.isna(row["percentile"]) else f"{row['percentile']:.1f}",
        "rank": None if pd.isna(row["rank"]) else int(row["rank"]),
        "of": total,
    }


def _signals(ranks: pd.DataFrame, example_id: int) -> list[dict]:
    if example_id not in ranks.index:
        return []
    row = ranks.loc[example_id]
    names = dict.fromkeys(name for name, _ in ranks.columns)
    return [
        {
            "name": name,
            "value": short_number(row[(name, "value")]),
            "rank": "" if pd.isna(row[(name, "rank")]) else int(row[(name, "rank")]),
            "of": int(row[(name, "of")]),
            "meaning": signal(name).meaning,
        }
        for name in names
    ]


def _decision(row: pd.Series, review: RunReview, run_id: str | None = None) -> dict:
    """A decision in force (made on ``run_id``, default the review's run); ``carried_from``: the earlier
    run of the lineage it was made on, if any."""
    made_on = row.get("decided_on_run")
    applied = row.get("applied_in")
    run_id = run_id or review.run_id
    return {
        "carried_from": made_on if isinstance(made_on, str) and made_on != run_id else None,
        "applied_in": applied if isinstance(applied, str) else None,
        "effect": decision_effect(applied),
        "text": decision_text(row["action"], row["label"], review.class_names, row.get("target_text")),
        "action": row["action"],
        "label": None if pd.isna(row["label"]) else int(row["label"]),
        "target_text": row.get("target_text") if row["action"] == "edit_target" else None,
        "reviewer": row["reviewer"],
        "note": "" if pd.isna(row["note"]) else str(row["note"]),
        "at": _minutes(row["decided_at"]),
    }


def _history(rows: pd.DataFrame, review: RunReview) -> list[dict]:
    return [
        {
            "run_id": row["run_id"],
            "carried": row["run_id"] != review.run_id,
            **_decision(row, review, row["run_id"]),
        }
        for _, row in rows.iterrows()
    ]


def _minutes(stamp: str) -> str:
    """'2026-11-28T18:33:25+00:00' -> '2026-11-28 18:33 UTC' (the store writes UTC ISO stamps)."""
    return f"{stamp[:10]} {stamp[11:16]} UTC" if isinstance(stamp, str) and len(stamp) >= 16 else str(stamp)
