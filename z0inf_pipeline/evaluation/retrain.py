"""Models retrained on subsets of the training data, cached on disk by the hash of their config.

Each retrained model is the recipe of a reference run with ``train_subset`` set: same data split,
seed, optimiser, schedule and epochs, so models differ only in which examples they saw. Only the
final weights are kept (a safetensors file named by the config's hash); losses are recomputed
from them in one no_grad pass per model, so a rerun with the same configs trains nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..influence.checkpoints import load_state_dict, read_checkpoint, save_checkpoint
from ..errors import InputError
from ..influence.loss_tables import evaluate_losses
from ..training import (
    ModelSpec,
    Split,
    TrainConfig,
    TrainResult,
    build_model,
    cross_entropy_per_example,
    train,
    training_data,
)
from .ground_truth import random_subsets

# Bump when the training loop changes in a way that makes cached models stale.
CACHE_VERSION = 1
_SECONDS_KEY = "z0inf.train_seconds"
_CONFIG_KEY = "z0inf.train_config"


def config_key(config: TrainConfig) -> str:
    """A stable hash of everything that determines the trained weights."""
    payload = json.dumps({"cache_version": CACHE_VERSION, **config.to_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class RetrainedModels:
    """Final weights of one model per subset.

    ``train_seconds`` is what training all of them cost (each file records its own training
    time, so cached models still count); ``trained`` is how many were trained by this call.
    """

    paths: list[Path]
    trained: int
    train_seconds: float


def retrain_on_subsets(
    config: TrainConfig,
    subsets: Sequence[Sequence[int]],
    cache_dir: str | os.PathLike,
    *,
    progress: bool = False,
) -> RetrainedModels:
    """Train ``config`` once per subset of training example ids; reuse cached models where present.

    Intermediate checkpoints do not change training, so retrained models save only the first
    and last; the cache key is the hash of the resulting config, which the file also records.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    paths, trained, seconds = [], 0, 0.0
    for ids in tqdm(subsets, desc="retrain", unit="model", disable=not progress):
        subset_config = config.replace(train_subset=tuple(sorted(int(i) for i in ids)), checkpoints=2)
        path = cache / f"{config_key(subset_config)}.safetensors"
        if not path.is_file():
            _train_into_cache(subset_config, path)
            trained += 1
        seconds += _recorded_train_seconds(path)
        paths.append(path)
    return RetrainedModels(paths, trained, seconds)


def _train_into_cache(config: TrainConfig, path: Path) -> None:
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".retrain.") as work:
        start = time.perf_counter()
        result = train(config, Path(work) / "run", record_losses=False)
        seconds = time.perf_counter() - start
        final = read_checkpoint(result.checkpoints[-1])
        metadata = {_SECONDS_KEY: repr(seconds), _CONFIG_KEY: json.dumps(config.to_dict(), sort_keys=True)}
        state = load_state_dict(final)
        save_checkpoint(path, state, step=final.step, epoch=final.epoch, learning_rate=final.learning_rate,
                        metadata=metadata)


def _recorded_train_seconds(path: Path) -> float:
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    try:
        return float(meta[_SECONDS_KEY])
    except (KeyError, ValueError):
        raise InputError(f"retrained model {path}: no training time in its metadata; delete the cache entry") from None


def load_model(path: str | os.PathLike, spec: ModelSpec) -> torch.nn.Module:
    """Rebuild a retrained model from its safetensors weights (never unpickled), in eval mode."""
    model = build_model(spec)
    model.load_state_dict(load_state_dict(path))
    return model.eval()


@dataclass(frozen=True)
class SubsampleRetraining:
    """SSRT inputs: which training examples each model saw, and every model's per-example losses."""

    masks: np.ndarray  # (R, N) bool, columns in train_ids order
    train_ids: np.ndarray
    test_ids: np.ndarray
    train_losses: np.ndarray  # (R, N) loss of each model on each training example (its training label)
    test_losses: np.ndarray  # (R, M)
    models: RetrainedModels


def subsample_and_retrain(
    reference: TrainResult,
    num_models: int,
    cache_dir: str | os.PathLike,
    *,
    fraction: float = 0.5,
    seed: int = 0,
    progress: bool = False,
) -> SubsampleRetraining:
    """Retrain ``reference``'s recipe on ``num_models`` random subsets (each example kept with probability
    ``fraction``) and evaluate every model on the reference run's whole train and test split."""
    if reference.config.train_subset is not None:
        raise InputError("subsample_and_retrain: the reference run must be trained on its whole train split")
    train_split, test_split = reference.bundle.train, reference.bundle.test
    masks = random_subsets(len(train_split), num_models, fraction, seed)
    models = retrain_on_subsets(
        reference.config, [train_split.example_ids[m] for m in masks], cache_dir, progress=progress
    )
    train_losses, test_losses = model_losses(models.paths, reference.model_spec, [train_split, test_split])
    return SubsampleRetraining(masks, train_split.example_ids, test_split.example_ids, train_losses, test_losses, models)


def model_losses(paths: Sequence[Path], spec: ModelSpec, splits: Sequence[Split]) -> list[np.ndarray]:
    """Per-example cross-entropy of every model on every split: one (R, n) array per split."""
    rows: list[list[torch.Tensor]] = [[] for _ in splits]
    for path in paths:
        model = load_model(path, spec)
        for row, split in zip(rows, splits):
            row.append(evaluate_losses(model, (split.features, split.labels), cross_entropy_per_example))
    return [torch.stack(row).numpy().astype(np.float64) for row in rows]


def random_drop_accuracy(recipe: TrainConfig, count: int) -> float:
    """Test accuracy of ``recipe`` retrained without ``count`` training examples drawn at random (seeded by
    the recipe): the baseline a reviewed curation should beat."""
    ids = training_data(recipe).train.example_ids
    dropped = np.random.default_rng(recipe.seed).choice(ids, size=min(count, len(ids) - 1), replace=False)
    with tempfile.TemporaryDirectory(prefix="z0inf-random-drop.") as work:
        result = train(recipe.replace(exclude_ids=tuple(int(i) for i in dropped)), Path(work) / "run",
                       record_losses=False)
    with torch.no_grad():
        predicted = result.model(result.bundle.test.features).argmax(dim=1)
    return float((predicted == result.bundle.test.labels).float().mean())
