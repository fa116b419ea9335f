"""Per-example loss tables: l_i(t) for every example i at every checkpoint t.

On disk a loss table is parquet: ``example_id`` plus one float32 column ``step_<s>`` per
checkpoint in step order; the steps are also stored in the file's metadata (``z0inf.steps``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from .atomic import atomic_output
from .checkpoints import Checkpoint, load_state_dict, open_checkpoints
from ..errors import InputError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ID_COLUMN = "example_id"
_STEP_COLUMN = re.compile(r"^step_(\d+)$")
_STEPS_KEY = b"z0inf.steps"
# Rows per parquet row group written: the writer encodes a row group whole before it flushes it, so a
# 10^6-example table is never held a second time, encoded, beside its values.
ROW_GROUP_ROWS = 65_536


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)`` by one sort: numpy 2.4 answers a plain ``np.unique`` of integers with a hash
    table, 0.7-1 s for 10^6 distinct example ids against 0.01 s for a sort, and every step that checks
    a run's ids paid it."""
    ordered = np.sort(np.asarray(values).ravel())
    distinct = np.ones(len(ordered), dtype=bool)
    distinct[1:] = ordered[1:] != ordered[:-1]
    return ordered[distinct]


def return_arrow_memory() -> None:
    """Hand what pyarrow freed back to the system. Its allocator (mimalloc) keeps freed memory for arrow's
    own reuse, beside numpy's heap: after a 10^6-example loss table was checked, 30 MB of it stayed
    resident. Called when a big read or write ends."""
    pa.default_memory_pool().release_unused()


def step_column(step: int) -> str:
    return f"step_{int(step)}"


def steps_of(columns: Sequence[str]) -> list[int]:
    """Checkpoint steps named by a loss table's ``step_<s>`` columns, in column order."""
    return [int(m.group(1)) for c in columns if (m := _STEP_COLUMN.match(c))]


@dataclass(frozen=True)
class LossTable:
    """Losses of N examples at T checkpoints: ``values`` is (T, N), rows in step order."""

    example_ids: np.ndarray
    steps: tuple[int, ...]
    values: torch.Tensor

    def __post_init__(self) -> None:
        if self.values.shape != (len(self.steps), len(self.example_ids)):
            raise InputError(
                f"loss table: values have shape {tuple(self.values.shape)}, expected "
                f"({len(self.steps)} checkpoints, {len(self.example_ids)} examples)"
            )

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically as parquet (float32 columns, steps in the metadata)."""
        columns = {ID_COLUMN: pa.array(np.asarray(self.example_ids, dtype=np.int64))}
        values = self.values.to(torch.float32).numpy()
        for t, s in enumerate(self.steps):
            columns[step_column(s)] = pa.array(values[t])
        table = pa.table(columns).replace_schema_metadata({_STEPS_KEY: json.dumps(list(self.steps)).encode()})
        with atomic_output(path) as tmp:
            pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
        return_arrow_memory()
        return Path(path)


def read_loss_table(path: str | os.PathLike, expected_steps: Sequence[int] | None = None) -> LossTable:
    """Read and validate a loss-table parquet file; errors name the file and the offending column."""
    ids, steps, columns = _checked_columns(Path(path), expected_steps)
    values = np.empty((len(steps), len(ids)), dtype=np.float32)
    for t, column in enumerate(columns):
        values[t] = column
    return LossTable(ids, steps, torch.from_numpy(values))


def check_loss_table(path: str | os.PathLike, expected_steps: Sequence[int] | None = None) -> np.ndarray:
    """Validate a loss-table file as ``read_loss_table`` does, holding one column at a time; return its
    example ids. For a writer checking what it wrote: a 10^6 x 20 table is never held whole."""
    ids, _, columns = _checked_columns(Path(path), expected_steps)
    for _ in columns:
        pass
    return ids


def _checked_columns(path: Path, expected_steps: Sequence[int] | None):
    """(example ids, steps, the step columns as float32 arrays one at a time): the file's layout, ids and
    steps checked at once, each column's values as it comes; the file's values are never held whole."""
    try:
        parquet = pq.ParquetFile(path)
    except FileNotFoundError:
        raise InputError(f"loss table {path}: no such file") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"loss table {path}: not a readable parquet file ({exc})") from None
    schema = parquet.schema_arrow
    names = schema.names
    if ID_COLUMN not in names:
        raise InputError(f"loss table {path}: has no '{ID_COLUMN}' column (columns: {names})")
    step_cols = [n for n in names if n != ID_COLUMN]
    bad = [n for n in step_cols if not _STEP_COLUMN.match(n)]
    if bad:
        raise InputError(f"loss table {path}: column(s) {bad} are not of the form 'step_<step>'")
    steps = steps_of(step_cols)
    meta = schema.metadata or {}
    if _STEPS_KEY in meta and json.loads(meta[_STEPS_KEY]) != steps:
        raise InputError(
            f"loss table {path}: columns {step_cols} disagree with the steps in its metadata "
            f"{json.loads(meta[_STEPS_KEY])}"
        )
    if steps != sorted(steps) or len(set(steps)) != len(steps):
        raise InputError(f"loss table {path}: step columns {step_cols} are not in increasing step order")
    if expected_steps is not None and list(expected_steps) != steps:
        missing = sorted(set(expected_steps) - set(steps))
        extra = sorted(set(steps) - set(expected_steps))
        raise InputError(
            f"loss table {path}: step columns do not match the checkpoints (checkpoint steps "
            f"{list(expected_steps)}; missing columns {[step_column(s) for s in missing]}, "
            f"extra columns {[step_column(s) for s in extra]})"
        )
    if parquet.metadata.num_rows == 0:
        raise InputError(f"loss table {path}: has no rows (no examples to score)")
    if not pa.types.is_integer(schema.field(ID_COLUMN).type):
        raise InputError(f"loss table {path}: column '{ID_COLUMN}' must hold integers, not {schema.field(ID_COLUMN).type}")
    ids = _read_column(parquet, path, ID_COLUMN).to_numpy().astype(np.int64, copy=False)
    if len(sorted_unique(ids)) != len(ids):
        raise InputError(f"loss table {path}: column '{ID_COLUMN}' has duplicate ids")
    for name in step_cols:
        if not pa.types.is_floating(schema.field(name).type):
            raise InputError(f"loss table {path}: column '{name}' must be floating point, not {schema.field(name).type}")

    def columns():
        for name in step_cols:
            column = _read_column(parquet, path, name)
            if column.null_count:
                raise InputError(f"loss table {path}: column '{name}' has {column.null_count} missing values")
            values = column.to_numpy().astype(np.float32, copy=False)
            finite = np.isfinite(values)
            if not finite.all():
                first = int(ids[np.argmin(finite)])
                raise InputError(
                    f"loss table {path}: column '{name}' has {int((~finite).sum())} NaN/inf values "
                    f"(first at example_id {first})"
                )
            yield values
            return_arrow_memory()

    return ids, tuple(steps), columns()


def _read_column(parquet: pq.ParquetFile, path: Path, name: str) -> pa.ChunkedArray:
    try:
        return parquet.read(columns=[name], use_threads=False).column(0)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"loss table {path}: column '{name}' is not readable ({exc})") from None


def evaluate_losses(
    model: torch.nn.Module,
    dataset: Dataset | tuple[torch.Tensor, torch.Tensor],
    loss_fn: LossFn,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 1024,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-example losses of ``model`` on ``dataset`` under ``torch.no_grad``, as an (N,) CPU tensor of
    ``dtype`` (float32 for loss tables; float64 keeps a float64 model's finite differences exact).

    ``loss_fn(outputs, targets)`` must return one value per example; it need not be
    differentiable (a 0-1 error works).
    """
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for inputs, targets in _batches(dataset, batch_size, device):
                losses = loss_fn(model(inputs), targets)
                if losses.shape != (len(targets),):
                    raise InputError(
                        f"loss_fn returned shape {tuple(losses.shape)} for a batch of {len(targets)} examples; "
                        "it must return one value per example (for example reduction='none')"
                    )
                out.append(losses.to(dtype))
    finally:
        model.train(was_training)
    return torch.cat(out).cpu()


def compute_loss_table(
    model_factory: Callable[[], torch.nn.Module],
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike | Checkpoint],
    dataset: Dataset | tuple[torch.Tensor, torch.Tensor],
    loss_fn: LossFn,
    *,
    example_ids: Sequence[int] | np.ndarray | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 1024,
    progress: bool = True,
) -> LossTable:
    """Evaluate every checkpoint on every example: the loss table Z0-Inf needs, in step order."""
    ckpts = open_checkpoints(checkpoints)
    model = model_factory().to(device)
    dataset = _on_device(dataset, device)  # tensor data is copied once, not once per checkpoint
    rows = []
    for ckpt in tqdm(ckpts, desc="loss table", unit="ckpt", disable=not progress):
        model.load_state_dict(load_state_dict(ckpt))
        rows.append(evaluate_losses(model, dataset, loss_fn, device=device, batch_size=batch_size))
    values = torch.stack(rows)
    ids = np.arange(values.shape[1], dtype=np.int64) if example_ids is None else np.asarray(example_ids, np.int64)
    return LossTable(ids, tuple(c.step for c in ckpts), values)


def _on_device(dataset, device):
    """(inputs, targets) tensors moved to ``device`` (a no-op when there already); other datasets as they are."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        dataset = tuple(dataset.tensors)
    return tuple(t.to(device) for t in dataset) if isinstance(dataset, tuple) else dataset


def _batches(dataset, batch_size: int, device):
    """Batches of (inputs, targets); tensor data is sliced directly instead of going through a DataLoader."""
    dataset = _on_device(dataset, device)
    if isinstance(dataset, tuple):
        inputs, targets = dataset
        for start in range(0, len(targets), batch_size):
            yield inputs[start : start + batch_size], targets[start : start + batch_size]
        return
    for inputs, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        yield inputs.to(device), targets.to(device)
