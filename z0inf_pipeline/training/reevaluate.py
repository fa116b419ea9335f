"""A run's data rebuilt from its training config, and its checkpoints re-evaluated on any device:
loss tables with any per-example loss, and the last checkpoint's predictions for the review queue."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import InputError
from ..influence.directions import ForwardAccess
from ..influence.loss_tables import LossTable, compute_loss_table
from ..influence.trak import text_run_refusal
from .datasets import DatasetBundle, Split
from .recording import cross_entropy_per_example
from .trainer import TrainConfig, training_data


def zero_one_per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 where the predicted class is wrong: Z0-Inf needs no gradient, so a 0-1 loss works."""
    return outputs.argmax(dim=1).ne(targets).to(torch.float32)


LOSSES = {"cross_entropy": cross_entropy_per_example, "zero_one": zero_one_per_example}


def rebuild_data(
    run_id: str, train_config: dict | None, model_spec: dict, examples: pd.DataFrame
) -> DatasetBundle | None:
    """The run's train/test data exactly as trained (same split, noise, curation), checked against its
    examples table; None when this project cannot rebuild it (no training config, a custom model
    factory, a dataset file that is not here)."""
    if train_config is None or "factory" in model_spec:
        return None
    try:
        bundle = training_data(TrainConfig.from_dict(train_config))
    except InputError:
        return None
    logged = examples.set_index("example_id")
    for name, split in (("train", bundle.train), ("test", bundle.test)):
        rows = logged[logged["split"] == name]
        same_ids = np.array_equal(np.sort(split.example_ids), np.sort(rows.index.to_numpy()))
        if not same_ids or not np.array_equal(rows.loc[split.example_ids, "label"], split.labels.numpy()):
            raise InputError(
                f"run {run_id}: its {name} data rebuilt from the training config does not match the run's "
                "examples table (ids or labels differ); the run cannot be analysed reproducibly"
            )
    return bundle


def recompute_loss_tables(
    model_factory: Callable[[], torch.nn.Module],
    checkpoints: Sequence,
    data: DatasetBundle,
    loss: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 4096,
) -> tuple[LossTable, LossTable]:
    """Train and test loss tables: every checkpoint evaluated on every example, on ``device`` in ``dtype``."""
    train, test = (
        split_loss_table(model_factory, checkpoints, split, loss, device=device, dtype=dtype, batch_size=batch_size)
        for split in (data.train, data.test)
    )
    return train, test


def split_loss_table(
    model_factory: Callable[[], torch.nn.Module],
    checkpoints: Sequence,
    split: Split,
    loss: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 4096,
) -> LossTable:
    """One split's (or one shard's) loss table. A shard that starts on a batch boundary is evaluated in
    exactly the batches of the whole split, so its losses are the same bits as the unsharded ones."""
    if loss not in LOSSES:
        raise InputError(f"loss {loss!r}: must be one of {sorted(LOSSES)}")
    return compute_loss_table(
        lambda: model_factory().to(dtype),
        checkpoints,
        (split.features.to(dtype), split.labels),
        LOSSES[loss],
        example_ids=split.example_ids,
        device=device,
        batch_size=batch_size,
        progress=False,
    )


def forward_access(
    model_factory: Callable[[], torch.nn.Module],
    data: DatasetBundle | None,
    train_ids: np.ndarray,
    test_ids: np.ndarray,
    *,
    dtype: torch.dtype = torch.float32,
) -> ForwardAccess | None:
    """The run's model and data for train-test influence along random directions, in the loss tables'
    example order (the rows of INF are the tables' rows); None when the data cannot be rebuilt. The loss
    is the training loss (cross-entropy): the directions estimate its gradient products, as TracIn does."""
    if data is None:
        return None
    return ForwardAccess(model_factory, _in_order(data.train, train_ids), _in_order(data.test, test_ids),
                         LOSSES["cross_entropy"], dtype)


def refuse_unfit_method(run_id: str, train_config: dict | None, method: str) -> None:
    """A text run (the LM recipe, ``"recipe": "lm"``) asked for method ``trak`` is refused by name: its data
    is not rebuilt here, so without this it would silently fall back to the trajectory."""
    if method == "trak" and (train_config or {}).get("recipe") == "lm":  # training.lm.RECIPE, without transformers
        raise InputError(text_run_refusal(f"run {run_id}"))


def _in_order(split: Split, example_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    order = pd.Index(split.example_ids).get_indexer(example_ids)
    if (order < 0).any():
        raise InputError("loss tables: hold example ids that the rebuilt data does not")
    if len(order) == len(split) and np.array_equal(order, np.arange(len(order))):
        return split.features, split.labels  # already in order: no copy of a mapped table's features
    index = torch.from_numpy(order)
    return split.features[index], split.labels[index]


def max_deviation(recomputed: LossTable, logged: LossTable) -> float:
    """Largest absolute difference between two loss tables of the same examples (any row order)."""
    order = pd.Index(logged.example_ids).get_indexer(recomputed.example_ids)
    if (order < 0).any() or recomputed.steps != logged.steps:
        raise InputError("loss tables: recomputed and logged tables hold different examples or steps")
    return float((recomputed.values - logged.values[:, order]).abs().max())


def final_predictions(
    model: torch.nn.Module,
    data: DatasetBundle,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 4096,
) -> pd.DataFrame:
    """Predicted label and its softmax probability for every train and test example."""
    frames = [
        split_predictions(model, name, split, device=device, dtype=dtype, batch_size=batch_size)
        for name, split in (("train", data.train), ("test", data.test))
    ]
    return pd.concat(frames, ignore_index=True)


def split_predictions(
    model: torch.nn.Module,
    name: str,
    split: Split,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 4096,
) -> pd.DataFrame:
    """``final_predictions`` of one split (or one shard of it), named ``name`` in the ``split`` column."""
    model = model.to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        probs = torch.cat(
            [
                torch.softmax(model(batch.to(device=device, dtype=dtype)), dim=1).cpu()
                for batch in split.features.split(batch_size)
            ]
        )
    confidence, predicted = probs.max(dim=1)
    return pd.DataFrame(
        {
            "example_id": split.example_ids,
            "split": name,
            "label": split.labels.numpy(),
            "predicted_label": predicted.numpy(),
            "confidence": confidence.double().numpy(),
        }
    )


def shard_of(split: Split, start: int, stop: int) -> Split:
    """Examples ``[start, stop)`` of a split, in its order (views, no copy)."""
    return Split(split.example_ids[start:stop], split.features[start:stop], split.labels[start:stop])
