"""Per-example losses of one split at every checkpoint, recorded while training runs.

``SplitRecorder`` is for in-memory tensors and ``loss_fn(outputs, targets)``; ``BatchLossRecorder``
for any iterable of batches carrying example ids and ``loss_fn(model, batch)``.

For tensors, one ``no_grad`` pass per checkpoint (``evaluate_losses``) yields both the loss row and, for
class-score outputs, which examples are classified correctly; rows go into a preallocated
(T, N) table that grows only if more checkpoints come than announced.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..influence.loss_tables import LossFn, LossTable, evaluate_losses, sorted_unique
from .table_files import release_pages, scratch_array

EVAL_BATCH_SIZE = 1024
# Rows evaluated between two ``release_pages`` calls: a table mapped from the data cache is read in
# slices of this many rows, so a checkpoint's evaluation holds one slice of it, not the whole split.
RECORD_CHUNK_ROWS = 64 * EVAL_BATCH_SIZE
# Hugging Face conventions: label tokens -100 are not scored; the inputs a causal LM is called with.
IGNORE_INDEX = -100
MODEL_INPUTS = ("input_ids", "attention_mask")


def cross_entropy_per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def token_mean_nll(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood of each sequence's label tokens (labels -100 are masked out), (B,).

    Causal LM convention: the logits at position t predict the label at t + 1. A sequence with no
    label token has no loss (0 / 0 = NaN), which the recorder refuses by name.
    """
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    counted = labels.ne(IGNORE_INDEX)
    return per_token.sum(dim=1) / counted.sum(dim=1)



class SplitRecorder:
    """Loss table of one split, filled one checkpoint at a time (on the device the model lives on)."""

    def __init__(
        self,
        example_ids: np.ndarray,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        loss_fn: LossFn = cross_entropy_per_example,
        capacity: int = 16,
        name: str = "split",
    ) -> None:
        self.example_ids = np.asarray(example_ids, dtype=np.int64)
        if len(self.example_ids) != len(features) or len(features) != len(labels):
            raise InputError(
                f"{name}: {len(self.example_ids)} example ids, {len(features)} feature rows and "
                f"{len(labels)} labels; they must match"
            )
        if len(sorted_unique(self.example_ids)) != len(self.example_ids):
            raise InputError(f"{name}: example ids are not unique")
        self.name = name
        self.data = (features, labels)
        self.loss_fn = loss_fn
        self.steps: list[int] = []
        self._values = _scratch_rows(max(capacity, 1), len(self.example_ids))

    def record(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Evaluate ``model`` on the split; return the mean loss and (for class scores) the accuracy."""
        if self.steps and step <= self.steps[-1]:
            raise InputError(f"{self.name}: checkpoint step {step} does not come after step {self.steps[-1]}")
        row = len(self.steps)
        if row == len(self._values):
            self._values = _scratch_rows(2 * row, len(self.example_ids), self._values)
        hits = 0
        scored = True

        def loss_and_hits(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            nonlocal hits, scored
            if outputs.ndim == 2 and not targets.is_floating_point():
                hits += int(outputs.argmax(dim=1).eq(targets).sum())
            else:
                scored = False
            return self.loss_fn(outputs, targets)

        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
        if self.data[0].device != device:  # moved once, then kept where the model lives
            self.data = tuple(t.to(device) for t in self.data)
        features, targets = self.data
        for start in range(0, len(targets), RECORD_CHUNK_ROWS):  # whole batches: the same bits as one pass
            rows = slice(start, start + RECORD_CHUNK_ROWS)
            self._values[row, rows] = evaluate_losses(model, (features[rows], targets[rows]), loss_and_hits,
                                                      device=device, batch_size=EVAL_BATCH_SIZE)
            release_pages()
        self.steps.append(int(step))
        summary = {f"{self.name}_loss": float(self._values[row].mean())}
        if scored:
            summary[f"{self.name}_accuracy"] = hits / len(self.example_ids)
        return summary

    def table(self) -> LossTable:
        return LossTable(self.example_ids, tuple(self.steps), self._values[: len(self.steps)])



def _scratch_rows(capacity: int, width: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(capacity, width) float32 loss rows on a scratch file (``scratch_array``), the rows of ``keep`` copied
    in: a split's record costs disk, not memory, between checkpoints."""
    rows = torch.from_numpy(scratch_array((capacity, width), np.float32))
    if keep is not None:
        rows[: len(keep)] = keep
    return rows


BatchLossFn = Callable[[torch.nn.Module, Any], torch.Tensor]
IdsFn = Callable[[Any], Any]
ID_KEY = "example_id"


def ids_from_batch(batch: Any) -> Any:
    """The default way to read example ids: ``batch["example_id"]`` (dict-like batches, as HF collators make)."""
    return batch[ID_KEY]


def move_batch(batch: Any, device: torch.device) -> Any:
    """Every tensor of a (nested) dict / list / tuple batch on ``device``; anything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [move_batch(v, device) for v in batch]
    if isinstance(batch, tuple):
        items = [move_batch(v, device) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else tuple(items)
    return batch


class BatchLossRecorder:
    """Loss table of one split read from any re-iterable source of batches (a ``DataLoader``, a list,
    a generator factory's output), so the data never has to sit in one tensor: memory is one batch
    plus the (T, N) float32 table.

    ``loss_fn(model, batch)`` returns one loss per example of the batch (any loss: token-mean NLL,
    0-1 error, a negative reward); ``ids_fn(batch)`` returns the batch's example ids. The first
    checkpoint fixes the split's ids and their order; every later checkpoint must see exactly the
    same ids in the same order, or the loss table would mix different examples under one id.
    """

    def __init__(self, batches: Iterable, loss_fn: BatchLossFn, *, ids_fn: IdsFn = ids_from_batch,
                 capacity: int = 16, name: str = "split") -> None:
        if isinstance(batches, Iterator):
            raise InputError(
                f"{name}: batches are a one-shot iterator; pass something iterable once per checkpoint "
                "(a DataLoader, a list, an object with __iter__)"
            )
        self.batches, self.loss_fn, self.ids_fn, self.name = batches, loss_fn, ids_fn, name
        self.example_ids: np.ndarray | None = None
        self.steps: list[int] = []
        self._capacity = max(capacity, 1)
        self._values: torch.Tensor | None = None

    def record(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """One ``no_grad`` pass over the batches; return the split's mean loss."""
        if self.steps and step <= self.steps[-1]:
            raise InputError(f"{self.name}: checkpoint step {step} does not come after step {self.steps[-1]}")
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
        ids_seen: list[np.ndarray] = []
        losses_seen: list[torch.Tensor] = []
        filled = 0
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for number, batch in enumerate(self.batches):
                    ids = self._batch_ids(batch, number, step)
                    losses = self._batch_losses(model, move_batch(batch, device), ids, number, step)
                    if self.example_ids is None:
                        ids_seen.append(ids)
                        losses_seen.append(losses)
                    else:
                        self._check_same_ids(ids, filled, number, step)
                        self._row(len(self.steps))[filled : filled + len(ids)] = losses
                    filled += len(ids)
        finally:
            model.train(was_training)
        if self.example_ids is None:
            self._fix_ids(ids_seen, step)
            self._row(0)[:] = torch.cat(losses_seen)
        elif filled != len(self.example_ids):
            raise InputError(
                f"{self.name}: at step {step} the batches hold {filled} examples, but {len(self.example_ids)} at "
                f"step {self.steps[0]}; the set must not change between checkpoints"
            )
        self.steps.append(int(step))
        return {f"{self.name}_loss": float(self._values[len(self.steps) - 1].double().mean())}

    def table(self) -> LossTable:
        if self.example_ids is None:
            raise InputError(f"{self.name}: no checkpoint was recorded")
        return LossTable(self.example_ids, tuple(self.steps), self._values[: len(self.steps)])

    def _batch_ids(self, batch: Any, number: int, step: int) -> np.ndarray:
        try:
            raw = self.ids_fn(batch)
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise InputError(
                f"{self.name}: batch {number} at step {step} carries no example ids ({type(exc).__name__}: {exc}); "
                f"put them in the batch (default: batch[{ID_KEY!r}]) or pass ids_fn"
            ) from None
        ids = np.asarray(raw.cpu() if isinstance(raw, torch.Tensor) else raw)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(
                f"{self.name}: batch {number} at step {step}: example ids must be a 1-d sequence of integers, "
                f"got {ids.dtype} of shape {ids.shape}"
            )
        return ids.astype(np.int64, copy=False)

    def _batch_losses(self, model, batch, ids: np.ndarray, number: int, step: int) -> torch.Tensor:
        losses = self.loss_fn(model, batch)
        if not isinstance(losses, torch.Tensor) or losses.shape != (len(ids),):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise InputError(
                f"{self.name}: loss_fn returned {shape} for batch {number} of {len(ids)} examples at step {step}; "
                "it must return one value per example, shape (B,)"
            )
        losses = losses.detach().to("cpu", torch.float32)
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            first = int(ids[int(torch.argmin(finite.to(torch.int8)))])
            raise InputError(
                f"{self.name}: loss_fn returned {int((~finite).sum())} NaN/inf loss(es) in batch {number} at step "
                f"{step} (first at example_id {first})"
            )
        return losses

    def _fix_ids(self, ids_seen: list[np.ndarray], step: int) -> None:
        if not ids_seen:
            raise InputError(f"{self.name}: the batches are empty at step {step}")
        ids = np.concatenate(ids_seen)
        unique, counts = np.unique(ids, return_counts=True)
        if len(unique) != len(ids):
            repeated = unique[counts > 1]
            raise InputError(
                f"{self.name}: {len(repeated)} example id(s) appear more than once across batches, e.g. "
                f"{repeated[:5].tolist()}; every example must come exactly once per pass (no shuffling "
                "sampler that draws with replacement, no drop_last)"
            )
        self.example_ids = ids
        self._values = torch.empty((self._capacity, len(ids)), dtype=torch.float32)

    def _check_same_ids(self, ids: np.ndarray, offset: int, number: int, step: int) -> None:
        expected = self.example_ids[offset : offset + len(ids)]
        if len(expected) != len(ids) or not np.array_equal(expected, ids):
            raise InputError(
                f"{self.name}: batch {number} at step {step} holds ids {ids[:5].tolist()}..., where step "
                f"{self.steps[0]} had {expected[:5].tolist()}...; the set and its order must not change between "
                "checkpoints (use shuffle=False)"
            )

    def _row(self, row: int) -> torch.Tensor:
        if row == len(self._values):
            self._values = torch.cat([self._values, torch.empty_like(self._values)])
        return self._values[row]
