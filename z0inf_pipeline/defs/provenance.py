"""The review gate is bound to the scores that were checked.

``self_influence_is_valid`` records the content hash of the scores it passed. Before the review
queue is rebuilt from stored scores (``retrain_job`` loads them from storage), the hash of what is
loaded now must equal the last passing check's, and the scores must cover every training example:
an edited file cannot shrink the queue and open the gate.
"""

from __future__ import annotations

import hashlib
import json

import dagster as dg
import numpy as np
import pandas as pd
from dagster._core.event_api import PartitionKeyFilter

SCORES_CHECK = dg.AssetCheckKey(dg.AssetKey("self_influence"), "self_influence_is_valid")
HASH_KEY = "scores_sha256"
# Set by the IO manager on frames it loads: the file they were read from.
SOURCE_ATTR = "z0inf.source"


def content_hash(frame: pd.DataFrame) -> str:
    """sha256 of a frame's column names and values, row order included (not of a file's bytes, so the
    same scores hash alike whether just computed or read back)."""
    digest = hashlib.sha256(json.dumps([str(c) for c in frame.columns]).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def checked_hash(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """The content hash recorded by the latest evaluation of the scores check for ``run_id`` if it
    passed; None when it failed or never ran."""
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [SCORES_CHECK], partition_filter=PartitionKeyFilter(key=run_id)
    ).get(SCORES_CHECK)
    if record is None or record.event is None or record.event.dagster_event is None:
        return None
    evaluation = record.event.dagster_event.asset_check_evaluation_data
    if not evaluation.passed or HASH_KEY not in evaluation.metadata:
        return None
    return str(evaluation.metadata[HASH_KEY].value)


def verify_scores(instance: dg.DagsterInstance, run_id: str, scores: pd.DataFrame, train_ids: np.ndarray) -> None:
    """Refuse (dg.Failure naming the file) scores that are not the checked ones or miss training examples."""
    source = scores.attrs.get(SOURCE_ATTR)
    where = f"self-influence scores {source or '(in memory)'} of run {run_id}"
    if source is not None:  # read from storage: it must be what the check passed
        _verify_checked(instance, run_id, scores, where)
    missing = np.setdiff1d(train_ids, scores["example_id"].to_numpy(np.int64))
    if len(missing):
        raise dg.Failure(
            f"{where}: cover {len(train_ids) - len(missing)} of {len(train_ids)} training examples "
            f"(missing ids {missing[:10].tolist()}{' ...' if len(missing) > 10 else ''}); "
            "materialise self_influence again (influence_job)"
        )


def _verify_checked(instance: dg.DagsterInstance, run_id: str, scores: pd.DataFrame, where: str) -> None:
    expected, actual = checked_hash(instance, run_id), content_hash(scores)
    if expected is None:
        raise dg.Failure(f"{where}: no passing self_influence_is_valid evaluation is recorded; run influence_job")
    if actual != expected:
        raise dg.Failure(
            f"{where}: content (sha256 {actual[:16]}) is not what self_influence_is_valid passed "
            f"(sha256 {expected[:16]}); the file changed after it was checked. Materialise self_influence again "
            "(influence_job)"
        )
