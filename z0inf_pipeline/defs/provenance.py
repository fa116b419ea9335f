"""The review gate is bound to the scores that were checked.

``self_influence_is_valid`` records the content hash of the scores it passed. Before the review
queue is rebuilt from stored scores (``retrain_job`` loads them from storage), the hash of what is
loaded now must equal the one the check passed in the Dagster run that materialised those scores,
and the scores must cover every training example: an edited file cannot shrink the queue and open
the gate.

Only Dagster's public API: the latest materialisation of ``self_influence`` for the run names the
Dagster run that wrote the scores, and that run's event log holds the check's evaluation. A check
planned but never evaluated (its run still going, or killed) is "not evaluated": a clear failure
that says to run ``influence_job``, never an internal error.
"""

from __future__ import annotations

import hashlib
import json

import dagster as dg
import numpy as np
import pandas as pd

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


def checked_hash(instance: dg.DagsterInstance, run_id: str) -> tuple[str | None, str]:
    """(content hash the scores check passed, what was found) for the latest stored scores of
    ``run_id``: the hash is None when the check failed, or was planned but never evaluated (the
    materialising Dagster run is still going or was killed), or the scores were never materialised."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=SCORES_CHECK.asset_key, asset_partitions=[run_id]), limit=1
    ).records
    if not records:
        return None, "self_influence was never materialised"
    dagster_run = records[0].run_id
    evaluations = [
        entry.dagster_event.asset_check_evaluation_data
        for entry in instance.all_logs(dagster_run, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        if entry.dagster_event is not None
        and entry.dagster_event.asset_check_evaluation_data.asset_check_key == SCORES_CHECK
    ]
    if not evaluations:
        return None, (
            f"self_influence_is_valid was not evaluated in Dagster run {dagster_run}, which wrote the scores "
            "(still running, or interrupted)"
        )
    evaluation = evaluations[-1]
    if not evaluation.passed:
        return None, f"self_influence_is_valid failed in Dagster run {dagster_run}"
    if HASH_KEY not in evaluation.metadata:
        return None, f"self_influence_is_valid in Dagster run {dagster_run} recorded no {HASH_KEY}"
    return str(evaluation.metadata[HASH_KEY].value), f"passed in Dagster run {dagster_run}"


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
    (expected, found), actual = checked_hash(instance, run_id), content_hash(scores)
    if expected is None:
        raise dg.Failure(f"{where}: no passing self_influence_is_valid evaluation ({found}); run influence_job")
    if actual != expected:
        raise dg.Failure(
            f"{where}: content (sha256 {actual[:16]}) is not what self_influence_is_valid passed "
            f"(sha256 {expected[:16]}); the file changed after it was checked. Materialise self_influence again "
            "(influence_job)"
        )
