"""A deterministic training loop that writes checkpoints and per-example loss tables as it goes.

Checkpoint t is taken *after* the update of its step (step 0: before any update); its recorded
learning rate is the one that update used (step 0: the initial rate), so it is never the
schedule's final zero.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from ..influence.checkpoints import save_checkpoint
from ..errors import ConfigurationError
from ..arguments import Settings
from . import layout
from .datasets import (
    BUILTIN_DATASETS,
    NOISE_KINDS,
    DatasetBundle,
    LabelNoise,
    Split,
    curate_train,
    load_dataset,
    subset,
)
from .models import MODEL_KINDS, ModelSpec, build_model
from .recording import SplitRecorder
from .table_files import release_pages

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "linear", "constant")
CHECKPOINT_UNITS = ("epoch", "step")


class TrainRecipe(Settings):
    """One training recipe: the settings the CLI flags and the launchpad show. ``checkpoints`` = T evenly
    spaced checkpoints (first and last included), unless ``checkpoint_every`` > 0 asks for one every n
    ``checkpoint_unit`` (plus first and last).

    Fine-tuning: with ``pretrain_fraction`` > 0 that share of the training split (its clean labels)
    first trains the model for ``pretrain_epochs``, without checkpoints; the rest (with any label
    noise) is the run's training set, and checkpoints are only taken while fine-tuning on it.
    """

    owner: ClassVar[str] = "train config"

    dataset: str = Field("digits", description=f"{', '.join(BUILTIN_DATASETS)}, or a .csv/.parquet file")
    model: Literal[MODEL_KINDS] = Field("mlp", description="model family")
    hidden: list[int] = Field([64], description="hidden layer widths, e.g. 128,64")
    epochs: int = Field(30, description="passes over the training set")
    checkpoints: int = Field(20, description="checkpoints T kept for Z0-Inf, evenly spaced, first and last included")
    optimizer: Literal[OPTIMIZERS] = Field("sgd", description="optimizer")
    lr: float = Field(0.1, description="peak learning rate")
    schedule: Literal[SCHEDULES] = Field("cosine", description="learning-rate schedule")
    momentum: float = Field(0.9, description="SGD momentum")
    weight_decay: float = Field(0.0, description="weight decay")
    batch_size: int = Field(64, description="examples per step")
    seed: int = Field(0, description="seed of the split, the initialisation and the batch order")
    test_fraction: float = Field(0.25, description="share of the data held out as the test split")
    label_noise: float = Field(0.0, description="share of training labels flipped on purpose")
    noise_kind: Literal[NOISE_KINDS] = Field(
        "uniform", description="uniform: a random other class; confusable: the class whose centroid lies nearest"
    )
    noise_seed: int = Field(0, description="seed of the label flips")
    checkpoint_every: int = Field(
        0, description="instead of T: one checkpoint every N checkpoint units (plus first and last); 0: off"
    )
    checkpoint_unit: Literal[CHECKPOINT_UNITS] = Field("epoch", description="unit of checkpoint_every")
    label_column: str = Field("label", description="label column of a .csv/.parquet dataset")
    pretrain_fraction: float = Field(
        0.0,
        description="fine-tuning: share of the training split (clean labels) that first pretrains the model, "
        "without checkpoints; 0: train from scratch",
    )
    pretrain_epochs: int = Field(0, description="fine-tuning: epochs of pretraining")

    @model_validator(mode="after")
    def _check(self) -> "TrainRecipe":
        checks = [
            (self.epochs >= 1, "epochs", "at least 1"),
            (self.checkpoints >= 2, "checkpoints", "at least 2 (the first and the last)"),
            (self.checkpoint_every >= 0, "checkpoint_every", "0 (off) or positive"),
            (self.batch_size >= 1, "batch_size", "at least 1"),
            (self.lr > 0, "lr", "positive"),
            (0.0 <= self.label_noise < 1.0, "label_noise", "in [0, 1)"),
            (0.0 < self.test_fraction < 1.0, "test_fraction", "between 0 and 1"),
            (0.0 <= self.pretrain_fraction < 1.0, "pretrain_fraction", "in [0, 1)"),
            ((self.pretrain_fraction > 0) == (self.pretrain_epochs > 0), "pretrain_epochs",
             "positive exactly when pretrain_fraction is (both set, or both 0)"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigurationError(f"train config: {name}={getattr(self, name)!r} must be {expected}")
        return self


class TrainConfig(TrainRecipe):
    """A recipe plus the curation only Python sets (a reviewed run's retraining, the retraining
    benchmarks): neither a flag nor launchpad config."""

    exclude_ids: tuple[int, ...] = Field((), description="training example ids left out (curation)")
    relabels: tuple[tuple[int, int], ...] = Field((), description="(example id, new label) pairs (curation)")
    train_subset: tuple[int, ...] | None = Field(None, description="train only on these example ids")

    @property
    def noise(self) -> LabelNoise | None:
        return LabelNoise(self.label_noise, self.noise_kind, self.noise_seed) if self.label_noise > 0 else None


# The demo's recipe: the default one (digits, an MLP with one hidden layer of 64, 30 epochs,
# 20 checkpoints) with 10% of the training labels flipped uniformly at random, so that there is
# something to find. Noise is always asked for explicitly: the default recipe has none.
DEMO_CONFIG = TrainConfig(label_noise=0.1)


@dataclass
class TrainResult:
    config: TrainConfig
    model_spec: ModelSpec
    bundle: DatasetBundle  # the data as trained: train split after subset / exclusion / relabels
    checkpoints: list[Path]
    train_losses: Path | None  # None when trained with record_losses=False
    test_losses: Path | None
    examples: Path
    metrics: list[dict]
    model: torch.nn.Module


def checkpoint_steps(total_steps: int, *, count: int = 20, every: int = 0, unit_steps: int = 1) -> list[int]:
    """Steps at which to checkpoint: every ``every * unit_steps`` steps, or ``count`` evenly spaced;
    always step 0 and ``total_steps``."""
    if every > 0:
        return sorted(set(range(0, total_steps, every * unit_steps)) | {total_steps})
    if count > total_steps + 1:
        raise ConfigurationError(
            f"checkpoints: {count} requested but training has only {total_steps} steps "
            f"({total_steps + 1} possible checkpoints)"
        )
    # floor(x + 0.5), not round(): banker's rounding can map two grid points to the same step.
    return np.floor(np.linspace(0, total_steps, count) + 0.5).astype(int).tolist()


def training_data(config: TrainConfig) -> DatasetBundle:
    """The data exactly as ``config`` trains on it: same split and noise, then subset, drops and relabels
    (the pretraining part, if any, left out)."""
    return _curated(_loaded(config), config)


def pretraining_data(config: TrainConfig) -> Split | None:
    """The examples ``config`` pretrains on, with their clean labels; None without pretraining."""
    return None if config.pretrain_fraction == 0 else _pretraining_split(_loaded(config), config)


def _curated(bundle: DatasetBundle, config: TrainConfig) -> DatasetBundle:
    return curate_train(bundle, exclude_ids=(*config.exclude_ids, *_pretraining_ids(bundle, config)),
                        relabels=config.relabels, train_subset=config.train_subset)


def _pretraining_split(bundle: DatasetBundle, config: TrainConfig) -> Split | None:
    if config.pretrain_fraction == 0:
        return None
    clean = replace(bundle.train, labels=bundle.clean_train_labels)
    return subset(clean, _pretraining_ids(bundle, config))


def _loaded(config: TrainConfig) -> DatasetBundle:
    return load_dataset(
        config.dataset, seed=config.seed, test_fraction=config.test_fraction, label_noise=config.noise,
        label_column=config.label_column, image=config.model == "cnn",
    )


def _pretraining_ids(bundle: DatasetBundle, config: TrainConfig) -> np.ndarray:
    """A seeded random ``pretrain_fraction`` of the training ids (none without pretraining)."""
    ids = bundle.train.example_ids
    count = int(round(config.pretrain_fraction * len(ids)))
    return np.sort(np.random.default_rng(config.seed).permutation(ids)[:count])


@dataclass(frozen=True)
class TrainingPlan:
    """A recipe checked against its data: everything that can reject it, worked out before any training
    (and before an MLflow run exists, so a rejected recipe leaves no failed run behind)."""

    data: DatasetBundle
    pretraining: Split | None  # ``pretraining_data``, from the same load as ``data``
    model_spec: ModelSpec
    steps_per_epoch: int
    total_steps: int
    checkpoint_schedule: list[int]


def plan_training(config: TrainConfig) -> TrainingPlan:
    """Load the data, build the model once and lay out the checkpoint steps; any problem is a named error."""
    loaded = _loaded(config)
    bundle = _curated(loaded, config)
    spec = ModelSpec(config.model, bundle.input_shape, bundle.num_classes, config.hidden)
    build_model(spec)
    steps_per_epoch = math.ceil(len(bundle.train) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    unit_steps = steps_per_epoch if config.checkpoint_unit == "epoch" else 1
    schedule = checkpoint_steps(total_steps, count=config.checkpoints, every=config.checkpoint_every,
                                unit_steps=unit_steps)
    return TrainingPlan(bundle, _pretraining_split(loaded, config), spec, steps_per_epoch, total_steps, schedule)


def train(
    config: TrainConfig,
    out_dir: Path,
    *,
    progress: bool = False,
    record_losses: bool = True,
    on_checkpoint: Callable[[dict], None] | None = None,
    plan: TrainingPlan | None = None,
) -> TrainResult:
    """Train ``config`` and write the run folder (see ``layout``) to ``out_dir``, replacing it whole.

    ``on_checkpoint`` receives each checkpoint's metrics row as soon as it is taken (live logging).
    With ``record_losses=False`` no loss tables are written and the rows hold step, epoch and lr only.
    ``plan``: the recipe's ``plan_training``, when the caller has already checked it.
    """
    out_dir = Path(out_dir)
    plan = plan or plan_training(config)
    bundle, spec = plan.data, plan.model_spec
    steps_per_epoch, total_steps, schedule = plan.steps_per_epoch, plan.total_steps, plan.checkpoint_schedule
    torch.manual_seed(config.seed)
    model = build_model(spec)
    pretraining = plan.pretraining
    if pretraining is not None:
        pretrain_steps = config.pretrain_epochs * math.ceil(len(pretraining) / config.batch_size)
        pretrain_shuffle = torch.Generator().manual_seed(config.seed + 1)
        for _ in _updates(model, _optimizer(config, model), pretraining.features, pretraining.labels,
                          config, config.pretrain_epochs, pretrain_steps, pretrain_shuffle):
            pass
    shuffle = torch.Generator().manual_seed(config.seed)

    features, labels = bundle.train.features, bundle.train.labels
    recorders = [
        SplitRecorder(split.example_ids, split.features, split.labels, capacity=len(schedule), name=name)
        for name, split in (("train", bundle.train), ("test", bundle.test))
    ] if record_losses else []
    optimizer = _optimizer(config, model)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        metrics: list[dict] = []

        def take_checkpoint(step: int, lr: float) -> None:
            row = {"step": step, "epoch": step / steps_per_epoch, "lr": lr}
            save_checkpoint(work / layout.checkpoint_name(step), model.state_dict(),
                            step=step, epoch=row["epoch"], learning_rate=lr)
            for recorder in recorders:
                row.update(recorder.record(model, step))
            metrics.append(row)
            if on_checkpoint is not None:
                on_checkpoint(row)

        step = 0
        take_checkpoint(step, config.lr)
        wanted = iter(schedule[1:])
        next_checkpoint = next(wanted, None)
        bar = tqdm(total=total_steps, desc=f"train {bundle.name} {config.model}", unit="step", disable=not progress)
        for step, lr in _updates(model, optimizer, features, labels, config, config.epochs, total_steps, shuffle):
            bar.update()
            # each row a shuffled batch draws from a mapped table faults in the pages around it (the kernel
            # maps 64 KiB per fault: about 54 MiB for 1024 rows, however small): hand them back every step
            release_pages()
            if step == next_checkpoint:
                take_checkpoint(step, lr)
                next_checkpoint = next(wanted, None)
        bar.close()

        train_table = test_table = None
        if record_losses:
            train_table = recorders[0].table().write(work / layout.TRAIN_LOSSES)
            test_table = recorders[1].table().write(work / layout.TEST_LOSSES)
        layout.write_examples(
            work / layout.EXAMPLES,
            train_ids=bundle.train.example_ids, train_labels=labels.numpy(),
            original_train_labels=bundle.clean_train_labels.numpy(), flipped_ids=bundle.flipped_ids,
            test_ids=bundle.test.example_ids, test_labels=bundle.test.labels.numpy(),
        )
        release_pages()  # the mapped ids and labels the examples table read
        layout.write_json(work / layout.MODEL_SPEC, spec.to_dict())
        layout.write_json(work / layout.TRAIN_CONFIG, config.to_dict())
        layout.write_manifest(work)
        _replace_folder(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def final(path: Path | None) -> Path | None:
        return None if path is None else out_dir / path.relative_to(work)

    return TrainResult(
        config=config, model_spec=spec, bundle=bundle,
        checkpoints=[out_dir / layout.checkpoint_name(row["step"]) for row in metrics],
        train_losses=final(train_table), test_losses=final(test_table), examples=out_dir / layout.EXAMPLES,
        metrics=metrics, model=model.eval(),
    )


def _updates(model, optimizer, features, labels, config: TrainConfig, epochs: int, total_steps: int, shuffle):
    """Minibatch updates over ``epochs`` with the config's schedule; yields (step, lr of that update) after each."""
    scheduler = _scheduler(optimizer, config.schedule, total_steps)
    model.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=shuffle)
        for batch in order.split(config.batch_size):
            lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(features[batch]), labels[batch]).backward()
            optimizer.step()
            scheduler.step()
            step += 1
            yield step, lr


def _scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int):
    """torch's schedules over ``total_steps`` updates: cosine annealing or linear decay to 0, or constant."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    if schedule == "linear":
        return torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=max(total_steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def _replace_folder(new: Path, target: Path) -> None:
    """Swap a finished folder into place, so ``target`` is either the old run or the new one, never a mix."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{new.name}")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)

