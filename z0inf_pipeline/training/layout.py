"""Where a training run's files go: the same layout in a local folder and in an MLflow run's artifacts.

A folder in this layout is complete only once ``manifest.json`` is written (last): it names every
file with its size and SHA-256, so a reader can tell a missing or truncated file from a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..influence.atomic import atomic_output
from ..influence.loss_tables import ROW_GROUP_ROWS, return_arrow_memory
from ..errors import InputError

CHECKPOINT_DIR = "checkpoints"
TRAIN_LOSSES = "loss_tables/train.parquet"
TEST_LOSSES = "loss_tables/test.parquet"
EXAMPLES = "examples.parquet"
MODEL_SPEC = "model_spec.json"
TRAIN_CONFIG = "train_config.json"
MANIFEST = "manifest.json"
REQUIRED_FILES = (MODEL_SPEC, EXAMPLES, TRAIN_LOSSES, TEST_LOSSES)
# MLflow run ids are hex strings; a custom store's may use letters, "_" and "-", never "/" or a leading "-".
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
EXAMPLE_COLUMNS = ("example_id", "split", "label", "original_label", "flipped")
# Optional text columns of contract v2 (sequence tasks, files): shown to reviewers, never parsed.
TEXT_COLUMNS = ("prompt", "target", "uri")
NO_LABEL = -1  # the label of an example that has no class (a sequence, a regression target)


def checkpoint_name(step: int) -> str:
    """Relative path of the checkpoint taken at ``step`` (zero-padded, so names sort by step)."""
    return f"{CHECKPOINT_DIR}/step_{int(step):08d}.safetensors"


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> dict:
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(payload, dict):
        raise InputError(f"{path}: holds JSON {type(payload).__name__}, expected an object")
    return payload


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """List every file under ``folder`` (relative POSIX path, bytes, sha256) in ``manifest.json``."""
    folder = Path(folder)
    files = [
        {"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    ]
    return write_json(folder / MANIFEST, {"files": files})


def write_examples(
    path: str | os.PathLike,
    *,
    train_ids: np.ndarray,
    train_labels: np.ndarray,
    original_train_labels: np.ndarray,
    flipped_ids: np.ndarray,
    test_ids: np.ndarray,
    test_labels: np.ndarray,
    text: Mapping[str, Sequence[str | None]] | None = None,
) -> Path:
    """The examples table: which ids were trained / tested on, with the label used and the label before noise;
    ``text`` adds ``TEXT_COLUMNS`` given in the same order (train ids, then test ids)."""
    train_ids = np.asarray(train_ids, dtype=np.int64)
    test_ids = np.asarray(test_ids, dtype=np.int64)
    text = dict(text or {})
    unknown = sorted(set(text) - set(TEXT_COLUMNS))
    wrong_length = [c for c, v in text.items() if len(v) != len(train_ids) + len(test_ids)]
    if unknown or wrong_length:
        raise InputError(
            f"examples table: text columns must be among {list(TEXT_COLUMNS)} (got {unknown}) and hold one "
            f"value per example (wrong length: {wrong_length})"
        )
    train_rows = len(train_ids)
    text_values = {c: list(v) for c, v in text.items()}
    schema = pa.schema([("example_id", pa.int64()), ("split", pa.string()), ("label", pa.int64()),
                        ("original_label", pa.int64()), ("flipped", pa.bool_()),
                        *((c, pa.string()) for c in text_values)])

    def rows(start: int, stop: int) -> pa.RecordBatch:
        """Rows ``start:stop`` of the table (train ids first, then test ids), built from slices: a
        10^6-example run is never concatenated whole."""
        train = slice(min(start, train_rows), min(stop, train_rows))
        test = slice(max(start - train_rows, 0), max(stop - train_rows, 0))
        ids = train_ids[train]
        sides = np.repeat(np.array([0, 1], dtype=np.int8), [len(ids), len(test_ids[test])])
        return pa.record_batch([
            np.concatenate([ids, test_ids[test]]),
            pa.array(["train", "test"], pa.string()).take(sides),
            np.concatenate([train_labels[train], test_labels[test]]).astype(np.int64),
            np.concatenate([original_train_labels[train], test_labels[test]]).astype(np.int64),
            np.concatenate([np.isin(ids, flipped_ids), np.zeros(len(sides) - len(ids), dtype=bool)]),
            *(pa.array(v[start:stop], pa.string()) for v in text_values.values()),
        ], schema=schema)

    total = train_rows + len(test_ids)
    with atomic_output(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, max(total, 1), ROW_GROUP_ROWS):
            writer.write_batch(rows(start, min(start + ROW_GROUP_ROWS, total)))
    return_arrow_memory()
    return Path(path)


def check_run_id(run_id: str, error: type[InputError] = InputError) -> str:
    """Refuse anything but a run id (a path, '..') before it names a folder or an MLflow request: the
    one rule for run ids (the contract cache, the outputs folders, the review store)."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise error(f"run id {run_id!r}: not a valid MLflow run id (letters, digits, '_' and '-' only)")
    return run_id
