"""Review cards: one flagged (or influential) training example with its evidence and its decisions,
as plain dicts that the review page and the review sheet render with the same template macros."""

from __future__ import annotations

import numpy as np
import pandas as pd
from markupsafe import Markup

from ..influence.signals import signal
from .evidence import RunEvidence, short_number, sparkline_svg


# How far to trust "helps most" / "hurts most": the default train-test method and its suite-mean LDS
# against TracInCP's, from benchmarks/README.md ("Train-test attribution"); updated with the suite.
ATTRIBUTION_ACCURACY = {"method": "METHOD", "lds": "LDS", "tracincp": "TRACIN", "table": "/accuracy"}


def decision_text(action, label) -> str:
    """'drop', 'keep' or 'relabel -> 4' ('' when there is no decision)."""
    if action is None or pd.isna(action):
        return ""
    return f"relabel → {int(label)}" if action == "relabel" and pd.notna(label) else str(action)


def training_cards(
    evidence: RunEvidence,
    example_ids,
    current: pd.DataFrame,
    history: pd.DataFrame | None = None,
    scores: dict[int, float] | None = None,
) -> list[dict]:
    """Cards for training examples, in the order given.

    ``current``: the decisions in force for the run (``RunReview.decisions``, with ``decided_on_run``
    when a decision was made on an earlier run of the lineage); ``history``: every
    decision on the run and the runs it was retrained from (``run_id`` plus the store's columns),
    oldest first; ``scores``: an influence score to show on each card (the test-example view).
    """
    ids = [int(i) for i in example_ids]
    queue = evidence.queue.set_index("example_id")
    examples = evidence.examples
    predictions = evidence.predictions
    ranks = evidence.signal_ranks
    standing = evidence.flag_standing
    total = int(evidence.info.get("training_examples", len(examples)))
    losses = evidence.loss_trajectories(ids)
    payloads = evidence.payloads(ids)
    effects = evidence.effects(ids)
    test_ids = {int(t) for helps, hurts in effects.values() for t in (*helps["test_example_id"], *hurts["test_example_id"])}
    test_cards = {c["id"]: c for c in test_example_cards(evidence, sorted(test_ids))}
    decided = current.set_index("example_id")
    by_example = {} if history is None or history.empty else dict(tuple(history.groupby("example_id")))
    names = evidence.class_names

    cards = []
    for i in ids:
        label = int(examples.at[i, "label"])
        predicted = _prediction(predictions, i, queue)
        trajectory = losses.get(i, np.array([]))
        decision = decided.loc[i] if i in decided.index else None
        helps, hurts = effects[i]
        cards.append(
            {
                "id": i,
                "in_queue": i in queue.index,
                "rank": int(queue.at[i, "rank"]) if i in queue.index else None,
                "flag": _flag(standing, i, total, evidence.info["policy"]["score"]),
                "label": label,
                "label_name": names[label] if 0 <= label < len(names) else str(label),
                "predicted": predicted[0],
                "probability": predicted[1],
                "disagrees": predicted[0] is not None and predicted[0] != label,
                "signals": _signals(ranks, i),
                "flagged_by": evidence.flagged_by(i) if i in queue.index else (),
                "score": None if scores is None else short_number(scores.get(i)),
                "spark": Markup(sparkline_svg(trajectory)),  # numbers only: safe to embed
                "loss_first": short_number(trajectory[0]) if len(trajectory) else "",
                "loss_last": short_number(trajectory[-1]) if len(trajectory) else "",
                "payload": payloads.get(i),
                "helps": [dict(test_cards[int(t)], score=short_number(s)) for t, s in helps.itertuples(index=False)],
                "hurts": [dict(test_cards[int(t)], score=short_number(s)) for t, s in hurts.itertuples(index=False)],
                "decision": None if decision is None else _decision(decision, evidence.run_id),
                "history": [] if i not in by_example else _history(by_example[i], evidence.run_id),
            }
        )
    return cards


def test_example_cards(evidence: RunEvidence, example_ids) -> list[dict]:
    """Small cards for test examples: picture, label and prediction."""
    ids = [int(i) for i in example_ids]
    payloads = evidence.payloads(ids)
    cards = []
    for i in ids:
        predicted, probability = _prediction(evidence.predictions, i)
        label = int(evidence.examples.at[i, "label"]) if i in evidence.examples.index else None
        cards.append(
            {
                "id": i,
                "label": label,
                "predicted": predicted,
                "probability": probability,
                "wrong": predicted is not None and label is not None and predicted != label,
                "payload": payloads.get(i),
            }
        )
    return cards


def _prediction(predictions: pd.DataFrame | None, example_id: int, queue: pd.DataFrame | None = None) -> tuple[int | None, str]:
    """(predicted label, the model's probability of it): the queue's ``predicted_probability`` for a
    flagged example, else the predictions file's (where that column is still called ``confidence``;
    the queue's ``confidence`` is the data-map signal)."""
    if queue is not None and example_id in queue.index and pd.notna(queue.at[example_id, "predicted_label"]):
        row = queue.loc[example_id]
        return int(row["predicted_label"]), _probability(row["predicted_probability"])
    if predictions is None or example_id not in predictions.index:
        return None, ""
    row = predictions.loc[example_id]
    return int(row["predicted_label"]), _probability(row["confidence"])


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


def _decision(row: pd.Series, run_id: str) -> dict:
    """A decision in force; ``carried_from``: the earlier run of the lineage it was made on, if any."""
    made_on = row.get("decided_on_run")
    return {
        "carried_from": made_on if isinstance(made_on, str) and made_on != run_id else None,
        "text": decision_text(row["action"], row["label"]),
        "action": row["action"],
        "label": None if pd.isna(row["label"]) else int(row["label"]),
        "reviewer": row["reviewer"],
        "note": "" if pd.isna(row["note"]) else str(row["note"]),
        "at": _minutes(row["decided_at"]),
    }


def _history(rows: pd.DataFrame, run_id: str) -> list[dict]:
    return [
        {
            "run_id": row["run_id"],
            "carried": row["run_id"] != run_id,
            **_decision(row, row["run_id"]),
        }
        for _, row in rows.iterrows()
    ]


def _minutes(stamp: str) -> str:
    """'2026-11-28T18:33:25+00:00' -> '2026-11-28 18:33 UTC' (the store writes UTC ISO stamps)."""
    return f"{stamp[:10]} {stamp[11:16]} UTC" if isinstance(stamp, str) and len(stamp) >= 16 else str(stamp)
