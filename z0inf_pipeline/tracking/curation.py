"""What a team's own training job reads after review: which training ids to keep, drop and relabel, and
which target texts (of a text run) to replace.

For runs the pipeline cannot re-run itself (``ContractLogger`` or Hugging Face callback runs),
``curated_training_set`` still logs its parquet file back to the source MLflow run, under
``z0inf/curated_training_set/curated_training_set.parquet``; this reads it (downloaded with the
same path checks as a contract run) against the run's own examples table.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .client import tracking_client
from .contract import ContractError
from .reader import download_artifact, fetch_run, list_artifacts

CURATED_ARTIFACT = "z0inf/curated_training_set/curated_training_set.parquet"


@dataclass(frozen=True)
class Curation:
    """The reviewed training set of one run: ``keep_ids`` (in the run's order), ``drop_ids``, and
    ``relabels`` (id -> new class label) for the kept examples that changed label, ``target_edits``
    (id -> new target text) for the kept examples of a text run whose target a reviewer edited."""

    run_id: str
    keep_ids: np.ndarray
    drop_ids: np.ndarray
    relabels: dict[int, int]
    target_edits: dict[int, str]


def curation_of(run_id: str, *, tracking_uri: str | None = None, cache_dir: Path | None = None) -> Curation:
    """The curation ``curated_training_set`` published for ``run_id``; ContractError if there is none yet."""
    run = fetch_run(run_id, tracking_uri=tracking_uri, cache_dir=cache_dir)
    client = tracking_client(tracking_uri)
    if CURATED_ARTIFACT not in list_artifacts(client, run_id):
        raise ContractError(
            f"run {run_id}: artifact {CURATED_ARTIFACT!r} is missing: review the queue, then materialise "
            "curated_training_set (`z0inf materialize retrain --run RUN`)"
        )
    with tempfile.TemporaryDirectory(prefix="z0inf-curation-") as tmp:
        download_artifact(client, run_id, CURATED_ARTIFACT, Path(tmp))
        curated = pd.read_parquet(Path(tmp) / CURATED_ARTIFACT)
    examples = pd.read_parquet(run.examples)
    train_ids = examples.loc[examples["split"] == "train", "example_id"].to_numpy(np.int64)
    kept = curated["example_id"].to_numpy(np.int64)
    strangers = np.setdiff1d(kept, train_ids)
    if len(strangers):
        raise ContractError(f"run {run_id}: artifact {CURATED_ARTIFACT!r} keeps ids {strangers[:5].tolist()} that "
                            "are not training examples of the run")
    relabelled = curated[curated["action"] == "relabel"]
    edited = curated[curated["action"] == "edit_target"] if "target_text" in curated else curated.iloc[:0]
    return Curation(
        run_id=run_id,
        keep_ids=train_ids[np.isin(train_ids, kept)],
        drop_ids=np.setdiff1d(train_ids, kept),
        relabels={int(i): int(y) for i, y in zip(relabelled["example_id"], relabelled["label"])},
        target_edits={int(i): str(t) for i, t in zip(edited["example_id"], edited["target_text"])},
    )
