"""Per-example losses of one split at every checkpoint, recorded while training runs.

One ``no_grad`` pass per checkpoint (``evaluate_losses``) yields both the loss row and, for
class-score outputs, which examples are classified correctly; rows go into a preallocated
(T, N) table that grows only if more checkpoints come than announced.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from ..influence.errors import InfluenceInputError
from ..influence.loss_tables import LossFn, LossTable, evaluate_losses

EVAL_BATCH_SIZE = 1024


def cross_entropy_per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


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
            raise InfluenceInputError(
                f"{name}: {len(self.example_ids)} example ids, {len(features)} feature rows and "
                f"{len(labels)} labels; they must match"
            )
        if len(np.unique(self.example_ids)) != len(self.example_ids):
            raise InfluenceInputError(f"{name}: example ids are not unique")
        self.name = name
        self.data = (features, labels)
        self.loss_fn = loss_fn
        self.steps: list[int] = []
        self._values = torch.empty((max(capacity, 1), len(self.example_ids)), dtype=torch.float32)
        self._correct = torch.empty(len(self.example_ids), dtype=torch.bool)

    def record(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Evaluate ``model`` on the split; return the mean loss and (for class scores) the accuracy."""
        if self.steps and step <= self.steps[-1]:
            raise InfluenceInputError(f"{self.name}: checkpoint step {step} does not come after step {self.steps[-1]}")
        row = len(self.steps)
        if row == len(self._values):
            self._values = torch.cat([self._values, torch.empty_like(self._values)])
        filled = 0
        scored = True

        def loss_and_hits(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            nonlocal filled, scored
            if outputs.ndim == 2 and not targets.is_floating_point():
                self._correct[filled : filled + len(targets)] = outputs.argmax(dim=1).eq(targets)
            else:
                scored = False
            filled += len(targets)
            return self.loss_fn(outputs, targets)

        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
        if self.data[0].device != device:  # moved once, then kept where the model lives
            self.data = tuple(t.to(device) for t in self.data)
        self._values[row] = evaluate_losses(model, self.data, loss_and_hits, device=device,
                                            batch_size=EVAL_BATCH_SIZE)
        self.steps.append(int(step))
        summary = {f"{self.name}_loss": float(self._values[row].mean())}
        if scored:
            summary[f"{self.name}_accuracy"] = float(self._correct.float().mean())
        return summary

    def table(self) -> LossTable:
        return LossTable(self.example_ids, tuple(self.steps), self._values[: len(self.steps)])

