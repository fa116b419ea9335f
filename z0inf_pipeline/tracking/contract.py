"""The run contract: what an MLflow run must hold for Z0-Inf to use it, and its checks.

Version 2 (written now) is version 1 (still read) opened to any model and data:

- tags: ``z0inf.contract`` = ``"2"`` (or ``"1"``), ``z0inf.num_checkpoints`` (set when the run finishes);
  optional ``z0inf.source``, ``z0inf.dataset``, ``z0inf.parent_run_id``; v2 adds ``z0inf.loss`` (the
  per-example loss the tables hold) and ``z0inf.checkpoint_parameters`` (``all``, or ``trainable`` /
  ``selected`` when checkpoints hold only some parameters: the Gram reads whatever is stored).
- params: ``n_train``, ``n_test`` (plus the training recipe for runs made by ``train_and_log``).
- metrics at every checkpoint step: ``train_loss`` and ``test_loss`` (means of the loss tables),
  ``train_accuracy`` / ``test_accuracy`` when the model outputs class scores, ``lr``, ``epoch``.
- artifacts: the folder layout of ``z0inf_pipeline.training.layout`` (checkpoints, loss tables,
  examples table, model spec, optional train config), listed with sizes and SHA-256 in ``manifest.json``.
  In v2 an example is an id plus optional columns: ``label`` (-1: no class label), and text
  ``prompt`` / ``target`` / ``uri``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..influence.checkpoints import Checkpoint, open_checkpoints
from ..errors import ContractError, InputError
from ..influence.loss_tables import LossTable, check_loss_table, read_loss_table, return_arrow_memory
from ..training import layout

CONTRACT_TAG = "z0inf.contract"
CONTRACT_VERSION = "2"
SUPPORTED_VERSIONS = ("1", "2")
LOSS_TAG = "z0inf.loss"
CHECKPOINT_PARAMETERS_TAG = "z0inf.checkpoint_parameters"
NUM_CHECKPOINTS_TAG = "z0inf.num_checkpoints"
SOURCE_TAG = "z0inf.source"
DATASET_TAG = "z0inf.dataset"
PARENT_TAG = "z0inf.parent_run_id"
REQUIRED_PARAMS = ("n_train", "n_test")
REQUIRED_METRICS = ("train_loss", "test_loss")
OPTIONAL_STEP_METRICS = ("train_accuracy", "test_accuracy")
_CHECKPOINT_FILE = re.compile(r"^checkpoints/step_(\d+)\.safetensors$")
_METRIC_TOLERANCE = 1e-4


def check_artifact_path(run_id: str, path: str) -> PurePosixPath:
    """Refuse artifact names that could leave the download folder: absolute paths, a ``..`` path part,
    backslashes. Judged by parts: ``notes..txt`` is an ordinary file name."""
    pure = PurePosixPath(path)
    if (
        not path
        or pure.is_absolute()
        or "\\" in path
        or "\x00" in path
        or ".." in pure.parts
        or re.match(r"^[A-Za-z]:", path)
    ):
        raise ContractError(
            f"run {run_id}: artifact {path!r} has an unsafe name (absolute, '..' or a backslash); "
            "it could be written outside the download folder, so the run was not downloaded"
        )
    return pure


def safe_destination(run_id: str, root: Path, path: str) -> Path:
    """``root / path``, checked (after resolving links) to stay inside ``root``."""
    check_artifact_path(run_id, path)
    root = root.resolve()
    destination = (root / path).resolve()
    if not destination.is_relative_to(root):
        raise ContractError(f"run {run_id}: artifact {path!r} resolves to {destination}, outside {root}")
    return destination


@dataclass(frozen=True)
class RunFiles:
    """A validated run folder."""

    checkpoints: list[Checkpoint]
    train_losses: LossTable
    test_losses: LossTable
    model_spec: dict
    train_config: dict | None
    manifest: dict

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]


def read_manifest(run_id: str, folder: Path) -> dict:
    path = folder / layout.MANIFEST
    if not path.is_file():
        raise ContractError(f"run {run_id}: artifact '{layout.MANIFEST}' is missing")
    try:
        manifest = json.loads(path.read_text())
        entries = manifest["files"]
        for entry in entries:
            entry.update(path=str(entry["path"]), bytes=int(entry["bytes"]), sha256=str(entry["sha256"]))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ContractError(f"run {run_id}: artifact '{layout.MANIFEST}' is malformed ({exc!r})") from None
    for entry in entries:
        check_artifact_path(run_id, entry["path"])
    listed = {e["path"] for e in entries}
    missing = [f for f in layout.REQUIRED_FILES if f not in listed]
    if missing:
        raise ContractError(f"run {run_id}: artifact(s) {missing} are missing (not in '{layout.MANIFEST}')")
    if not any(_CHECKPOINT_FILE.match(p) for p in listed):
        raise ContractError(f"run {run_id}: has no checkpoints ({layout.CHECKPOINT_DIR}/step_<step>.safetensors)")
    return manifest


def validate_run_folder(folder: Path, *, run_id: str = "(local)", verify_hashes: bool = True) -> RunFiles:
    """Check a run folder against the contract: files as the manifest says, every checkpoint readable
    with the step its name says, both loss tables with one column per checkpoint step, the examples
    table covering exactly the loss tables' ids, and a model spec that builds. ``verify_hashes=False``
    skips the SHA-256 of every file (sizes are still checked): for a folder already verified once."""
    manifest, checkpoints, tables, spec, config = _checked_folder(
        Path(folder), run_id, verify_hashes, read_loss_table, lambda table: table.example_ids)
    return RunFiles(checkpoints, tables[0], tables[1], spec, config, manifest)


def check_run_folder(folder: Path, *, run_id: str) -> int:
    """``validate_run_folder``'s checks, every hash included, holding one loss-table column at a time;
    the number of checkpoints. For the writer about to upload: a 10^6-example run's tables are not read
    back whole only to be dropped."""
    _, checkpoints, *_ = _checked_folder(Path(folder), run_id, True, check_loss_table, lambda ids: ids)
    return len(checkpoints)


def _checked_folder(folder: Path, run_id: str, verify_hashes: bool, read_table, ids_of):
    """The contract's checks; the loss tables as ``read_table`` returns them, their ids by ``ids_of``."""
    from ..training.models import ModelSpec

    manifest = read_manifest(run_id, folder)
    for entry in manifest["files"]:
        path = safe_destination(run_id, folder, entry["path"])
        if not path.is_file():
            raise ContractError(f"run {run_id}: artifact {entry['path']!r} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ContractError(
                f"run {run_id}: artifact {entry['path']!r} has {size} bytes, the manifest says {entry['bytes']} "
                "(truncated or altered)"
            )
        if verify_hashes and layout.file_digest(path) != entry["sha256"]:
            raise ContractError(f"run {run_id}: artifact {entry['path']!r} does not match its SHA-256 in the manifest")

    names = sorted(e["path"] for e in manifest["files"] if e["path"].startswith(f"{layout.CHECKPOINT_DIR}/"))
    odd = [n for n in names if not _CHECKPOINT_FILE.match(n)]
    if odd:
        raise ContractError(
            f"run {run_id}: artifact(s) {odd} in {layout.CHECKPOINT_DIR}/ are not named step_<step>.safetensors"
        )
    checkpoints = _contract_call(run_id, layout.CHECKPOINT_DIR, open_checkpoints, [folder / n for n in names])
    for ckpt in checkpoints:
        name = ckpt.path.relative_to(folder).as_posix()
        if int(_CHECKPOINT_FILE.match(name).group(1)) != ckpt.step:
            raise ContractError(f"run {run_id}: artifact {name!r} holds step {ckpt.step} in its metadata")
    if len(checkpoints) < 2:
        raise ContractError(f"run {run_id}: has {len(checkpoints)} checkpoint; Z0-Inf needs at least 2")
    steps = [c.step for c in checkpoints]
    tables = [
        _contract_call(run_id, rel, read_table, folder / rel, expected_steps=steps)
        for rel in (layout.TRAIN_LOSSES, layout.TEST_LOSSES)
    ]
    _check_examples(run_id, folder / layout.EXAMPLES, *(ids_of(table) for table in tables))
    spec = layout.read_json(folder / layout.MODEL_SPEC)
    if "factory" not in spec:
        _contract_call(run_id, layout.MODEL_SPEC, ModelSpec.from_dict, spec)
    config_path = folder / layout.TRAIN_CONFIG
    config = layout.read_json(config_path) if config_path.is_file() else None
    return manifest, checkpoints, tables, spec, config


def check_metrics(run_id: str, histories: dict[str, dict[int, float]], files: RunFiles) -> None:
    """Logged loss metrics exist at every checkpoint step and equal the means of the loss tables."""
    for split, table in (("train", files.train_losses), ("test", files.test_losses)):
        key = f"{split}_loss"
        history = histories.get(key, {})
        missing = [s for s in files.steps if s not in history]
        if missing:
            raise ContractError(f"run {run_id}: metric {key!r} is missing at checkpoint step(s) {missing[:10]}")
        means = table.values.double().mean(dim=1).tolist()
        for step, mean in zip(files.steps, means):
            if not math.isclose(history[step], mean, rel_tol=_METRIC_TOLERANCE, abs_tol=_METRIC_TOLERANCE):
                raise ContractError(
                    f"run {run_id}: metric {key!r} at step {step} is {history[step]:.6g}, but the mean of "
                    f"{layout.TRAIN_LOSSES if split == 'train' else layout.TEST_LOSSES} there is {mean:.6g}"
                )
    for key in OPTIONAL_STEP_METRICS:
        history = histories.get(key)
        if history:
            missing = [s for s in files.steps if s not in history]
            if missing:
                raise ContractError(f"run {run_id}: metric {key!r} is missing at checkpoint step(s) {missing[:10]}")


def check_tags_and_params(run_id: str, tags: dict, params: dict, files: RunFiles | None = None) -> None:
    version = tags.get(CONTRACT_TAG)
    if version not in SUPPORTED_VERSIONS:
        raise ContractError(
            f"run {run_id}: tag {CONTRACT_TAG!r} is {version!r}; this reader understands versions {SUPPORTED_VERSIONS}"
        )
    missing = [p for p in REQUIRED_PARAMS if p not in params]
    if missing:
        raise ContractError(f"run {run_id}: param(s) {missing} are missing")
    if NUM_CHECKPOINTS_TAG not in tags:
        raise ContractError(f"run {run_id}: tag {NUM_CHECKPOINTS_TAG!r} is missing (the run never finished logging)")
    if files is None:
        return
    expected = {
        NUM_CHECKPOINTS_TAG: (tags[NUM_CHECKPOINTS_TAG], len(files.checkpoints)),
        "n_train": (params["n_train"], len(files.train_losses.example_ids)),
        "n_test": (params["n_test"], len(files.test_losses.example_ids)),
    }
    for name, (logged, actual) in expected.items():
        if str(logged) != str(actual):
            raise ContractError(f"run {run_id}: {name} says {logged}, but the artifacts hold {actual}")


def _check_examples(run_id: str, path: Path, train_ids: np.ndarray, test_ids: np.ndarray) -> None:
    """Its columns from the schema; its ids, by split, against the loss tables' (the two columns read alone:
    a 10^6-example table as pandas rows was 60 MB of Python strings)."""
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001 - any parquet failure means a malformed artifact
        raise ContractError(f"run {run_id}: artifact '{layout.EXAMPLES}' is not readable parquet ({exc})") from None
    missing = [c for c in layout.EXAMPLE_COLUMNS if c not in schema.names]
    if missing:
        raise ContractError(f"run {run_id}: artifact '{layout.EXAMPLES}' lacks column(s) {missing}")
    odd = [c for c in layout.TEXT_COLUMNS if c in schema.names
           and not (pa.types.is_string(schema.field(c).type) or pa.types.is_large_string(schema.field(c).type))]
    if odd:
        raise ContractError(f"run {run_id}: artifact '{layout.EXAMPLES}' column(s) {odd} must hold text")
    try:
        table = pq.read_table(path, columns=["example_id", "split"], read_dictionary=["split"])
        for split, ids in (("train", train_ids), ("test", test_ids)):
            chosen = table.column("example_id").filter(pc.equal(table.column("split"), split))
            listed = np.sort(chosen.to_numpy().astype(np.int64, copy=False))
            del chosen  # one copy of a split's ids at a time beside the table
            if not np.array_equal(listed, np.sort(ids)):
                raise ContractError(
                    f"run {run_id}: artifact '{layout.EXAMPLES}' lists {len(listed)} {split} ids that differ from the "
                    f"{len(ids)} ids of the {split} loss table"
                )
    except pa.ArrowException as exc:
        raise ContractError(f"run {run_id}: artifact '{layout.EXAMPLES}' is not readable parquet ({exc})") from None
    finally:
        return_arrow_memory()


def _contract_call(run_id: str, artifact: str, fn, *args, **kwargs):
    """Run a core validator, re-raising its complaint as a ContractError that names run and artifact."""
    try:
        return fn(*args, **kwargs)
    except ContractError:
        raise
    except InputError as exc:
        raise ContractError(f"run {run_id}: artifact {artifact!r} is malformed: {exc}") from None
