"""The review queue: every flagged training example with what a reviewer needs to decide on it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..influence.errors import InfluenceInputError
from ..influence.loss_tables import step_column, steps_of
from .policy import Flags

QUEUE_COLUMNS = [
    "rank",
    "example_id",
    "self_influence",
    "robust_z",
    "label",
    "predicted_label",
    "confidence",
    "original_label",
    "flipped",
    "loss_first",
    "loss_last",
    "loss_trajectory",
    "decision",
    "decision_label",
]


def build_review_queue(
    scores: pd.DataFrame,
    flags: Flags,
    train_examples: pd.DataFrame,
    train_losses: pd.DataFrame,
    predictions: pd.DataFrame | None,
    decisions: pd.DataFrame,
) -> pd.DataFrame:
    """Flagged examples, highest self-influence first (rank 1), with label, predicted label, the loss
    at every checkpoint, and the decision recorded so far (a snapshot: the store stays authoritative)."""
    if len(flags.flagged) != len(scores):
        raise InfluenceInputError(f"review queue: {len(flags.flagged)} flags for {len(scores)} scores")
    queue = scores.loc[flags.flagged, ["example_id", "self_influence"]].copy()
    queue["robust_z"] = flags.robust_z[flags.flagged]
    queue = queue.sort_values("self_influence", ascending=False, kind="stable").reset_index(drop=True)
    queue.insert(0, "rank", np.arange(1, len(queue) + 1, dtype=np.int64))

    examples = train_examples.set_index("example_id")
    missing = np.setdiff1d(queue["example_id"], examples.index)
    if len(missing):
        raise InfluenceInputError(f"review queue: flagged ids {missing[:5].tolist()} are not training examples")
    queue["label"] = examples.loc[queue["example_id"], "label"].to_numpy()
    queue["original_label"] = examples.loc[queue["example_id"], "original_label"].to_numpy()
    queue["flipped"] = examples.loc[queue["example_id"], "flipped"].to_numpy()
    if predictions is not None:
        predicted = predictions.set_index("example_id").reindex(queue["example_id"])
        queue["predicted_label"] = predicted["predicted_label"].astype("Int64").to_numpy()
        queue["confidence"] = predicted["confidence"].to_numpy(dtype=np.float64)
    else:
        queue["predicted_label"] = pd.array([pd.NA] * len(queue), dtype="Int64")
        queue["confidence"] = np.nan

    step_columns = [step_column(s) for s in steps_of(train_losses.columns)]
    losses = train_losses.set_index("example_id").reindex(queue["example_id"])[step_columns].to_numpy(np.float32)
    queue["loss_first"] = losses[:, 0] if len(step_columns) else np.nan
    queue["loss_last"] = losses[:, -1] if len(step_columns) else np.nan
    queue["loss_trajectory"] = list(losses)

    current = decisions.set_index("example_id").reindex(queue["example_id"])
    queue["decision"] = current["action"].to_numpy()
    queue["decision_label"] = current["label"].astype("Int64").to_numpy()
    return queue[QUEUE_COLUMNS]


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

    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise InfluenceInputError(
            f"review queue {path}: no such file (materialise the run's review_queue first)"
        ) from None
    info = (table.schema.metadata or {}).get(_INFO_KEY)
    if info is None:
        raise InfluenceInputError(f"review queue {path}: has no review metadata (not written by the pipeline)")
    return table.to_pandas(), json.loads(info)
