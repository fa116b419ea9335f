"""The review queue: every flagged training example with what a reviewer needs to decide on it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import InputError
from ..influence.loss_tables import step_column, steps_of
from ..influence.signals import SIGNAL_COLUMNS, suspicion_ranks
from ..training.layout import TEXT_COLUMNS
from .policy import Flags

QUEUE_COLUMNS = [
    "rank",
    "example_id",
    "flag_score",
    "flagged_by",
    "robust_z",
    *SIGNAL_COLUMNS,
    *(f"{column}_rank" for column in SIGNAL_COLUMNS),
    "label",
    "predicted_label",
    "predicted_probability",
    "original_label",
    "flipped",
    "loss_first",
    "loss_last",
    "loss_trajectory",
    "decision",
    "decision_label",
    "decided_on_run",
]


def build_review_queue(
    scores: pd.DataFrame,
    flags: Flags,
    train_examples: pd.DataFrame,
    train_losses: pd.DataFrame,
    predictions: pd.DataFrame | None,
    decisions: pd.DataFrame,
) -> pd.DataFrame:
    """Flagged examples, highest flag score first (rank 1), with every signal and its rank among all
    training examples (1 = most suspicious), the signals that flag it on their own, label, predicted
    label, the loss at every checkpoint, and the decision in force so far (a snapshot: the store stays
    authoritative). ``decisions`` may carry ``decided_on_run`` (the lineage run a decision came from)."""
    if len(flags.flagged) != len(scores):
        raise InputError(f"review queue: {len(flags.flagged)} flags for {len(scores)} scores")
    signals = [c for c in SIGNAL_COLUMNS if c in scores]
    everyone = scores[["example_id", *signals]].reset_index(drop=True)
    everyone = pd.concat([everyone, suspicion_ranks(everyone, signals)], axis=1)
    everyone["flag_score"] = flags.score
    everyone["robust_z"] = flags.robust_z
    everyone["flagged_by"] = flags.flagged_by if flags.flagged_by is not None else ""
    queue = everyone[flags.flagged].sort_values("flag_score", ascending=False, kind="stable").reset_index(drop=True)
    queue.insert(0, "rank", np.arange(1, len(queue) + 1, dtype=np.int64))
    for column in SIGNAL_COLUMNS:  # a scores frame without a signal: the column is there, empty
        if column not in queue:
            queue[column] = np.nan
            queue[f"{column}_rank"] = pd.array([pd.NA] * len(queue), dtype="Int64")

    examples = train_examples.set_index("example_id")
    missing = np.setdiff1d(queue["example_id"], examples.index)
    if len(missing):
        raise InputError(f"review queue: flagged ids {missing[:5].tolist()} are not training examples")
    queue["label"] = examples.loc[queue["example_id"], "label"].to_numpy()
    queue["original_label"] = examples.loc[queue["example_id"], "original_label"].to_numpy()
    queue["flipped"] = examples.loc[queue["example_id"], "flipped"].to_numpy()
    if predictions is not None:
        predicted = predictions.set_index("example_id").reindex(queue["example_id"])
        queue["predicted_label"] = predicted["predicted_label"].astype("Int64").to_numpy()
        queue["predicted_probability"] = predicted["confidence"].to_numpy(dtype=np.float64)
    else:
        queue["predicted_label"] = pd.array([pd.NA] * len(queue), dtype="Int64")
        queue["predicted_probability"] = np.nan

    step_columns = [step_column(s) for s in steps_of(train_losses.columns)]
    losses = train_losses.set_index("example_id").reindex(queue["example_id"])[step_columns].to_numpy(np.float32)
    queue["loss_first"] = losses[:, 0] if len(step_columns) else np.nan
    queue["loss_last"] = losses[:, -1] if len(step_columns) else np.nan
    queue["loss_trajectory"] = list(losses)

    current = decisions.set_index("example_id").reindex(queue["example_id"])
    queue["decision"] = current["action"].to_numpy()
    queue["decision_label"] = current["label"].astype("Int64").to_numpy()
    queue["decided_on_run"] = (
        current["decided_on_run"].to_numpy(dtype=object) if "decided_on_run" in current else None
    )
    text = [c for c in TEXT_COLUMNS if c in examples.columns]  # prompt / answer / file: what a reviewer reads
    for column in text:
        queue[column] = examples.loc[queue["example_id"], column].to_numpy()
    return queue[QUEUE_COLUMNS + text]


def detection_quality(flagged_ids, flipped_ids) -> dict[str, float] | None:
    """Precision and recall of the flagged set against deliberately flipped labels (None: no flips known)."""
    flagged = np.unique(np.asarray(list(flagged_ids), dtype=np.int64))
    flipped = np.unique(np.asarray(list(flipped_ids), dtype=np.int64))
    if len(flipped) == 0:
        return None
    hits = len(np.intersect1d(flagged, flipped))
    return {
        "precision": hits / len(flagged) if len(flagged) else 0.0,
        "recall": hits / len(flipped),
        "flagged": float(len(flagged)),
        "flipped": float(len(flipped)),
        "true_positives": float(hits),
    }


_INFO_KEY = b"z0inf.review"


def write_review_queue(queue: pd.DataFrame, path, info: dict) -> None:
    """Write the queue as parquet (atomically) with ``info`` (policy, cut-off, training-set size) in
    the file's metadata, so the gate and the CLI judge the queue by the policy that built it."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..influence.atomic import atomic_output

    table = pa.Table.from_pandas(queue, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _INFO_KEY: json.dumps(info).encode()})
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)


def read_review_queue(path) -> tuple[pd.DataFrame, dict]:
    """(queue, info) as written by ``write_review_queue``."""
    import json

    import pyarrow.parquet as pq

    import pyarrow as pa

    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise InputError(
            f"review queue {path}: no such file (materialise the run's review_queue first)"
        ) from None
    except (pa.ArrowException, OSError) as exc:
        raise InputError(
            f"review queue {path}: cannot be read ({type(exc).__name__}: {exc}); materialise the run's review_queue "
            "again (influence_job)"
        ) from None
    info = (table.schema.metadata or {}).get(_INFO_KEY)
    if info is None:
        raise InputError(f"review queue {path}: has no review metadata (not written by the pipeline)")
    try:
        return table.to_pandas(), json.loads(info)
    except (pa.ArrowException, ValueError) as exc:
        raise InputError(f"review queue {path}: cannot be read ({exc}); materialise it again") from None
