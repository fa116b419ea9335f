"""Accuracy of every zeroth-order signal against retraining and against the tools users know, on a suite.

    nice -n 10 python benchmarks/accuracy.py          # full suite: writes benchmarks/results/accuracy.{md,json}
    nice -n 10 python benchmarks/accuracy.py --quick  # smoke run: few models, to benchmarks/results/cache/quick/
    nice -n 5 python benchmarks/accuracy.py --counts  # only the flag-count section (cheap), into the existing results

The suite (``CASES``) spans four datasets (digits, breast_cancer, wine, mnist1d), three models (logreg,
MLP, CNN), two optimisers (SGD with momentum and a cosine schedule, AdamW), training from scratch and
fine-tuning from a pretrained start (checkpoints only while fine-tuning), and three noise settings
(10% uniform flips, 20% confusable flips, clean). Per case it measures, for every signal of
``z0inf_pipeline.influence.signals`` and for a grid of Z0-Inf settings (checkpoint window, k, eta,
centring): Spearman against subsample-and-retrain (SSRT) self-influence, LDS of train-test
attributions on held-out subsets, and AUPRC / AUROC against the injected flips. Peers (the ``bench``
extra, imported here only): captum's TracInCP, TRAK (``traker``, CPU projector) and cleanlab.

Defaults are read off the suite MEAN (``choose_defaults``), never one case; the markdown says whether
the library's coded defaults are the suite's choice. Retrained models are cached under
benchmarks/results/cache/retrain/ by config hash, so a rerun trains only the reference runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from z0inf_pipeline.evaluation import (
    detection_scores,
    linear_datamodeling_score,
    load_model,
    retrain_on_subsets,
    spearman,
    ssrt_self_influence,
    subsample_and_retrain,
)
from z0inf_pipeline.influence import (
    gram_matrix,
    load_state_dict,
    open_checkpoints,
    read_loss_table,
    self_influence,
    train_test_influence,
    warmup_window,
)
from z0inf_pipeline.influence.analysis import InfluenceArguments, TrainTestArguments
from z0inf_pipeline.influence.estimators import InfluenceFactors, combine_standardised, influence_features
from z0inf_pipeline.influence.directions import ForwardAccess, direction_checkpoint_positions, direction_features
from z0inf_pipeline.influence.trak import trak_checkpoint_positions, trak_features
from z0inf_pipeline.errors import InputError
from z0inf_pipeline.influence.signals import SIGNAL_COLUMNS, flag_score, loss_signals
from z0inf_pipeline.review.policy import FlagPolicy, flag_scores, held_out_excess
from z0inf_pipeline.training import Split, TrainConfig, TrainResult, build_model, cross_entropy_per_example, train

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    name: str
    config: TrainConfig

    @property
    def noisy(self) -> bool:
        return self.config.label_noise > 0


_SGD = dict(optimizer="sgd", lr=0.1, schedule="cosine", momentum=0.9)
_ADAMW = dict(optimizer="adamw", lr=3e-3, schedule="cosine", weight_decay=1e-4)
_UNIFORM10 = dict(label_noise=0.1, noise_kind="uniform")
_CONFUSABLE20 = dict(label_noise=0.2, noise_kind="confusable")
_FINE_TUNE = dict(pretrain_fraction=0.4, pretrain_epochs=20)

CASES: tuple[Case, ...] = (
    Case("digits / MLP / SGD / scratch / uniform 10%", TrainConfig(**_SGD, **_UNIFORM10)),
    Case("digits / CNN / AdamW / scratch / confusable 20%",
         TrainConfig(model="cnn", hidden=(32,), epochs=6, **_ADAMW, **_CONFUSABLE20)),
    Case("breast_cancer / logreg / SGD / scratch / uniform 10%",
         TrainConfig(dataset="breast_cancer", model="logreg", epochs=30, **_SGD, **_UNIFORM10)),
    Case("breast_cancer / MLP / AdamW / scratch / clean", TrainConfig(dataset="breast_cancer", epochs=30, **_ADAMW)),
    Case("wine / MLP / SGD / scratch / confusable 20%",
         TrainConfig(dataset="wine", epochs=60, batch_size=16, **_SGD, **_CONFUSABLE20)),
    Case("mnist1d / MLP / AdamW / scratch / uniform 10%",
         TrainConfig(dataset="mnist1d", hidden=(128,), epochs=20, batch_size=128, **_ADAMW, **_UNIFORM10)),
    Case("digits / MLP / SGD / fine-tune / confusable 20%",
         TrainConfig(epochs=15, **{**_SGD, "lr": 0.03}, **_FINE_TUNE, **_CONFUSABLE20)),
    Case("mnist1d / MLP / SGD / fine-tune / uniform 10%",
         TrainConfig(dataset="mnist1d", hidden=(128,), epochs=10, batch_size=128, **{**_SGD, "lr": 0.03},
                     **{**_FINE_TUNE, "pretrain_epochs": 15}, **_UNIFORM10)),
    Case("digits / logreg / AdamW / scratch / clean", TrainConfig(model="logreg", epochs=20, **_ADAMW)),
)

# The Z0-Inf settings the suite compares (the window is a warm-up fraction of training, by step).
WARMUPS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5)
NEIGHBORS = (1, 2, 4, 8, 12, 16)
ETAS = ("uniform", "learning_rate")
NEIGHBOR_RULES = ("order", "distance")
CENTERINGS = (False, True)
# Forward-only random directions (train-test): direction counts per parameter set (all; or the last layer:
# the classifier's last Linear, the LM's last MLP and final norm, where the frozen prefix runs once per batch,
# so P = 1024 costs less than P = 256 over all parameters), checkpoints, step weights and the weight of the
# trajectory term. Smaller P and C are prefixes of the largest (direction p and
# the checkpoint positions are nested), so one pass per parameter set serves all; its cost is measured, the
# smaller settings' scaled from it (cost is linear in P x C). C = 4 was within 0.01 of C = 1 on the first
# four cases in an earlier run (0.514 against 0.506 at P = 256), so it is not in the grid.
DIRECTION_COUNTS = {"all": (64, 256), "last layer": (64, 256, 1024)}
DIRECTION_CHECKPOINTS = (1, 2)
# the trajectory term's share against the directions' (each standardised per test example: combine_standardised)
TRAJECTORY_WEIGHTS = (0.0, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Scale:
    """How many models a run trains (``--quick`` shrinks everything)."""

    ssrt_models: int = 40
    holdout_models: int = 20
    trak_proj_dim: int = 256
    trak_checkpoints: int = 4
    lds_test_examples: int | None = None  # None: every test example


QUICK = Scale(ssrt_models=24, holdout_models=6, trak_proj_dim=128, trak_checkpoints=2, lds_test_examples=100)


@dataclass
class Report:
    """Everything measured, as JSON-able rows per section."""

    sections: dict[str, list[dict]] = field(default_factory=dict)
    notes: dict[str, object] = field(default_factory=dict)

    def add(self, section: str, quiet: bool = False, **row) -> None:
        self.sections.setdefault(section, []).append(row)
        if not quiet:
            shown = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            print(f"[{section}] {shown}", flush=True)

    def frame(self, section: str) -> pd.DataFrame:
        return pd.DataFrame(self.sections.get(section, []))


class Stopwatch:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


class PeakMemory:
    """Peak resident memory above the level at entry (MiB), sampled every 2 ms from /proc/self/statm:
    torch's CPU allocations bypass tracemalloc, and a process-wide maxrss never comes back down."""

    _PAGE = os.sysconf("SC_PAGE_SIZE")

    @classmethod
    def _rss(cls) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * cls._PAGE

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.mib = (self.peak - self.base) / 2**20


class Measured:
    """Wall time and peak memory of one block: ``with Measured() as cost: ...; cost.seconds, cost.mib``."""

    def __enter__(self):
        self._clock, self._memory = Stopwatch().__enter__(), PeakMemory().__enter__()
        return self

    def __exit__(self, *exc):
        self._memory.__exit__(*exc)
        self._clock.__exit__(*exc)
        self.seconds, self.mib = self._clock.seconds, self._memory.mib


# ---------------------------------------------------------------------------------------------
# Z0-Inf inputs: one Gram matrix and the loss tables of a run
# ---------------------------------------------------------------------------------------------


@dataclass
class Z0Inputs:
    gram: torch.Tensor
    steps: list[int]
    train: torch.Tensor  # (T, N)
    test: torch.Tensor  # (T, M)
    learning_rates: torch.Tensor


def z0_inputs(run: TrainResult) -> Z0Inputs:
    checkpoints = open_checkpoints(run.checkpoints)
    steps = [c.step for c in checkpoints]
    train_table = read_loss_table(run.train_losses, expected_steps=steps)
    test_table = read_loss_table(run.test_losses, expected_steps=steps)
    for table, split in ((train_table, run.bundle.train), (test_table, run.bundle.test)):
        if not np.array_equal(table.example_ids, split.example_ids):
            raise RuntimeError("loss table columns are not in the run's example order")
    return Z0Inputs(gram_matrix(checkpoints), steps, train_table.values.double(), test_table.values.double(),
                    torch.tensor([c.learning_rate for c in checkpoints], dtype=torch.float64))


def windowed(z0: Z0Inputs, warmup: float):
    """(gram, train, test, learning rates) restricted to the warm-up window, as the analysis does."""
    keep = torch.from_numpy(warmup_window(z0.steps, warmup))
    return z0.gram[keep][:, keep], z0.train[keep], z0.test[keep], z0.learning_rates[keep]


def signal_frame(z0: Z0Inputs, args: InfluenceArguments) -> pd.DataFrame:
    """Every signal as the analysis computes it: Z0 finite-difference at ``args`` (window, k, eta, centring),
    the loss-table signals over every checkpoint."""
    gram, train_losses, _, lrs = windowed(z0, args.warmup_fraction)
    eta = lrs if args.eta == "learning_rate" else None
    fd = self_influence(gram, train_losses, args.neighbors, eta, center_losses=args.center_losses).numpy()
    return pd.DataFrame({"self_influence": fd, **loss_signals(z0.train)})


# ---------------------------------------------------------------------------------------------
# Peers: captum TracInCP, TRAK, cleanlab (bench extra; imported only here)
# ---------------------------------------------------------------------------------------------


def last_linear(model: nn.Module) -> str:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]


def tracin(run: TrainResult, last_layer_only: bool):
    """captum TracInCP over the run's checkpoints, weighted by each checkpoint's learning rate.

    Checkpoints are loaded from safetensors (never torch.load); per-example gradients come from
    captum's batched implementation (sum-reduced loss, sample_wise_grads_per_batch=True).
    """
    from captum.influence import TracInCP

    checkpoints = open_checkpoints(run.checkpoints)
    learning_rate = {str(c.path): c.learning_rate for c in checkpoints}

    def load(model: nn.Module, path: str) -> float:
        model.load_state_dict(load_state_dict(path))
        return learning_rate[str(path)]

    model = build_model(run.model_spec)
    train_split = run.bundle.train
    return TracInCP(
        model,
        torch.utils.data.TensorDataset(train_split.features, train_split.labels),
        [str(c.path) for c in checkpoints],
        checkpoints_load_func=load,
        layers=[last_linear(model)] if last_layer_only else None,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=512,
        sample_wise_grads_per_batch=True,
    )


def tracin_self(run: TrainResult, last_layer_only: bool = False) -> tuple[np.ndarray, float]:
    with Stopwatch() as clock:
        scores = tracin(run, last_layer_only).self_influence(show_progress=False)
    return scores.numpy().astype(np.float64), clock.seconds


def tracin_train_test(run: TrainResult, last_layer_only: bool = False) -> tuple[np.ndarray, float]:
    test = run.bundle.test
    with Stopwatch() as clock:
        scores = tracin(run, last_layer_only).influence((test.features, test.labels))  # (M, N)
    return scores.T.numpy().astype(np.float64), clock.seconds


def trak_train_test(run: TrainResult, trak_checkpoints: int, proj_dim: int) -> tuple[np.ndarray, float]:
    """TRAK scores (N, M) over every parameter, as ``--method trak`` computes them (``influence.trak``)."""
    checkpoints = open_checkpoints(run.checkpoints)
    positions = trak_checkpoint_positions(trak_checkpoints, len(checkpoints))
    names = [name for name, _ in build_model(run.model_spec).named_parameters()]
    with Stopwatch() as clock:
        scores, _ = trak_features(forward_access(run), [checkpoints[p] for p in positions], names,
                                  projection_dim=proj_dim)
    return scores.numpy(), clock.seconds


def cleanlab_scores(run: TrainResult, cache: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """cleanlab find_label_issues on 5-fold out-of-fold probabilities from the same recipe.

    Returns a score for every example that orders cleanlab's flagged examples first (by its
    self-confidence ranking) and the rest after them by the same quality score, the flag mask,
    and the wall time including the 5 fold trainings (cached models count their training time).
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import StratifiedKFold

    train_split = run.bundle.train
    labels = train_split.labels.numpy()
    folds = list(StratifiedKFold(n_splits=5, shuffle=True, random_state=0).split(labels, labels))
    models = retrain_on_subsets(run.config, [train_split.example_ids[fit] for fit, _ in folds], cache)
    with Stopwatch() as clock:
        probabilities = np.empty((len(labels), run.bundle.num_classes))
        for path, (_, held_out) in zip(models.paths, folds):
            with torch.no_grad():
                logits = load_model(path, run.model_spec)(train_split.features[held_out])
            probabilities[held_out] = torch.softmax(logits.double(), dim=1).numpy()
        flagged = find_label_issues(labels, probabilities, n_jobs=1)
        quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    return flagged + (1.0 - quality), flagged, clock.seconds + models.train_seconds


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------

DEFAULT_ARGS = InfluenceArguments()
DEFAULT_TRAIN_TEST = TrainTestArguments()
PAIR_SCORES = tuple("+".join(pair) for pair in itertools.combinations(SIGNAL_COLUMNS, 2))


def _in_and_out(masks: np.ndarray) -> np.ndarray:
    return masks.any(axis=0) & ~masks.all(axis=0)


def evaluate_case(report: Report, case: Case, work: Path, cache: Path, scale: Scale) -> None:
    name = case.name
    with Stopwatch() as clock:
        run = train(case.config, work / f"case-{len(report.sections.get('cases', []))}")
    ssrt = subsample_and_retrain(run, scale.ssrt_models, cache, seed=0)
    holdout = subsample_and_retrain(run, scale.holdout_models, cache, seed=1)
    truth = ssrt_self_influence(ssrt.masks, ssrt.train_losses)
    flipped = np.isin(run.bundle.train.example_ids, run.bundle.flipped_ids)
    half = len(ssrt.masks) // 2
    first, second = slice(None, half), slice(half, None)
    both = _in_and_out(ssrt.masks[first]) & _in_and_out(ssrt.masks[second])  # all examples unless R is tiny
    ceiling = spearman(ssrt_self_influence(ssrt.masks[first][:, both], ssrt.train_losses[first][:, both]),
                       ssrt_self_influence(ssrt.masks[second][:, both], ssrt.train_losses[second][:, both]))
    report.add("cases", case=name, train_examples=len(flipped), flipped=int(flipped.sum()),
               test_accuracy=float(run.metrics[-1]["test_accuracy"]), train_seconds=clock.seconds,
               retrained_now=ssrt.models.trained + holdout.models.trained, ssrt_split_half=ceiling)
    z0 = z0_inputs(run)

    def detection(scores: np.ndarray) -> dict:
        if not case.noisy:
            return {}
        metrics = detection_scores(scores, flipped)
        return {"auprc": metrics.auprc, "auroc": metrics.auroc}

    for warmup, k, eta, center, rule in itertools.product(WARMUPS, NEIGHBORS, ETAS, CENTERINGS, NEIGHBOR_RULES):
        gram, train_losses, _, lrs = windowed(z0, warmup)
        if k >= gram.shape[0]:
            continue
        si = self_influence(gram, train_losses, k, lrs if eta == "learning_rate" else None,
                            center_losses=center, neighbor_rule=rule).numpy()
        report.add("z0_grid", quiet=True, case=name, warmup=warmup, k=k, eta=eta, center=center, rule=rule,
                   spearman=spearman(si, truth), **detection(si))

    frame = signal_frame(z0, DEFAULT_ARGS)
    for score in (*SIGNAL_COLUMNS, *PAIR_SCORES):
        values = flag_score(frame, score)
        report.add("signals", quiet=True, case=name, score=score, spearman=spearman(values, truth), **detection(values))

    # LDS on the first ``lds_test_examples`` test examples (all of them in a full run)
    shown = slice(None, scale.lds_test_examples)
    test = run.bundle.test
    lds_run = replace(run, bundle=replace(run.bundle, test=Split(test.example_ids[shown], test.features[shown],
                                                                   test.labels[shown])))

    def lds(scores: np.ndarray) -> float:
        return linear_datamodeling_score(scores, holdout.masks, holdout.test_losses[:, shown]).mean

    evaluate_train_test(report, name, classifier_subject(run, lds_run, z0, scale), lds)
    values, seconds = tracin_self(run)
    report.add("peers", case=name, method="TracInCP", spearman=spearman(values, truth), seconds=seconds,
               **detection(values))
    if case.noisy:
        values, flags, seconds = cleanlab_scores(run, cache)
        report.add("peers", case=name, method="cleanlab", seconds=seconds, flagged=int(flags.sum()), **detection(values))
    evaluate_counts(report, case, run, work, cache)


# ---------------------------------------------------------------------------------------------
# Train-test attribution: every method's LDS with its wall time and peak memory
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainTestSubject:
    """What every train-test method needs from one case: the loss tables' inputs, the run's checkpoints,
    model and data (for random directions), and the peers to compare with, each a ``() -> (N, M) scores``."""

    z0: Z0Inputs
    checkpoints: list
    access: ForwardAccess
    parameter_names: list[str]
    last_layer: list[str]  # the subset setting: the classifier's last Linear, the LM's last MLP and final norm
    peers: dict


def evaluate_train_test(report: Report, name: str, subject: TrainTestSubject, lds) -> None:
    """LDS of the trajectory grid (window, k, rule; centring and correlation weighting at the default k),
    of random directions at every (P, checkpoints, eta, trajectory weight), and of the peers, each with
    its wall time and peak memory (``tests/influence/test_directions.py`` checks that ``InfluenceAnalysis``
    computes the same ``direction_features``)."""
    z0 = subject.z0
    shown = len(subject.access.test[1])
    measure = lds

    def lds(scores: np.ndarray) -> float:
        """LDS, and 0 for scores that predict nothing (every prediction equal: no rank correlation)."""
        try:
            return measure(scores)
        except InputError:
            return 0.0

    for warmup, k, rule in itertools.product(WARMUPS, NEIGHBORS, NEIGHBOR_RULES):
        gram, train_losses, test_losses, _ = windowed(z0, warmup)
        if k >= gram.shape[0]:
            continue
        with Measured() as cost:
            inf = train_test_influence(gram, train_losses, test_losses[:, :shown], k, neighbor_rule=rule).numpy()
        report.add("z0_lds", quiet=True, case=name, warmup=warmup, k=k, rule=rule, center=False, weight=False,
                   lds=lds(inf), seconds=cost.seconds, mib=cost.mib)
    for warmup, center, weight in itertools.product(WARMUPS, CENTERINGS, (False, True)):
        gram, train_losses, test_losses, _ = windowed(z0, warmup)
        k = min(DEFAULT_ARGS.neighbors, gram.shape[0] - 1)
        if not (center or weight) or k < 1:
            continue
        inf = train_test_influence(gram, train_losses, test_losses[:, :shown], k,
                                   neighbor_rule=DEFAULT_ARGS.neighbor_rule, center_losses=center,
                                   weight_by_correlation=weight).numpy()
        report.add("z0_lds", quiet=True, case=name, warmup=warmup, k=k, rule=DEFAULT_ARGS.neighbor_rule,
                   center=center, weight=weight, lds=lds(inf))

    gram, train_losses, test_losses, _ = windowed(z0, DEFAULT_TRAIN_TEST.warmup_fraction)
    trajectory = influence_features(gram, train_losses, test_losses[:, :shown],
                                    min(DEFAULT_TRAIN_TEST.neighbors, gram.shape[0] - 1), None,
                                    DEFAULT_TRAIN_TEST.neighbor_rule)
    positions = direction_checkpoint_positions(warmup_window(z0.steps, DEFAULT_TRAIN_TEST.warmup_fraction),
                                               max(DIRECTION_CHECKPOINTS))
    blocks = len(positions)
    for parameters, names in (("all", subject.parameter_names), ("last layer", subject.last_layer)):
        top = max(DIRECTION_COUNTS[parameters])
        with Measured() as cost:  # one pass at the largest P and C; smaller settings are its prefixes
            train_s, test_s = direction_features(subject.access, [subject.checkpoints[p] for p in positions], names,
                                                 None, directions=top, step_size=DEFAULT_TRAIN_TEST.step_size,
                                                 seed=DEFAULT_TRAIN_TEST.seed)
        train_s = train_s.reshape(len(train_s), blocks, top) * top  # back to s_{i,p}: features carry 1/P
        test_s = test_s.reshape(len(test_s), blocks, top)
        for P, C, eta in itertools.product(DIRECTION_COUNTS[parameters], DIRECTION_CHECKPOINTS, ETAS):
            use = slice(blocks - min(C, blocks), blocks)  # positions ascend: the last C end at the last checkpoint
            step_weights = (z0.learning_rates[positions[use]] if eta == "learning_rate"
                            else torch.ones(len(positions[use]), dtype=torch.float64))
            directions = InfluenceFactors(
                (train_s[:, use, :P] * step_weights[None, :, None] / P).reshape(len(train_s), -1),
                test_s[:, use, :P].reshape(len(test_s), -1), None, None)
            for weight in TRAJECTORY_WEIGHTS:
                factors = directions if weight == 0 else combine_standardised(directions, trajectory, weight)
                report.add("directions_lds", quiet=True, case=name, parameters=parameters, P=P, C=C, eta=eta,
                           trajectory_weight=weight, lds=lds(factors.scores().T.numpy()),
                           seconds=cost.seconds * P * min(C, blocks) / (top * blocks), mib=cost.mib)
    best = max((r for r in report.sections["directions_lds"] if r["case"] == name), key=lambda r: r["lds"])
    print(f"[directions_lds] {name}: best of the grid {best}", flush=True)
    for method, scores in subject.peers.items():
        with Measured() as cost:
            values = scores()
        report.add("train_test", case=name, method=method, lds=lds(values), seconds=cost.seconds, mib=cost.mib)


def classifier_subject(run: TrainResult, lds_run: TrainResult, z0: Z0Inputs, scale: Scale) -> TrainTestSubject:
    """A classification case: its model spec and data, captum TracInCP and TRAK as peers."""
    model = build_model(run.model_spec)
    head = last_linear(model)
    return TrainTestSubject(
        z0, open_checkpoints(run.checkpoints), forward_access(lds_run), [n for n, _ in model.named_parameters()],
        [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] == head],
        {"TracInCP": lambda: tracin_train_test(lds_run)[0],
         "TRAK": lambda: trak_train_test(lds_run, scale.trak_checkpoints, scale.trak_proj_dim)[0]},
    )


def evaluate_lm_case(report: Report, case, work: Path, scale: Scale) -> None:
    """An LM fine-tuning case (``lm_cases``): held-out answer accuracy and train-test LDS only (no SSRT:
    the LM recipe's review signals are measured in docs/run-contract.md)."""
    from lm_cases import TokenLM, train_lm_case

    with Stopwatch() as clock:
        run = train_lm_case(case, work, scale.holdout_models)
    report.add("lm_cases", case=case.name, train_examples=len(run.train[0]), test_accuracy=run.test_accuracy,
               train_seconds=clock.seconds, holdout_models=scale.holdout_models)
    z0 = Z0Inputs(gram_matrix(run.checkpoints), [c.step for c in run.checkpoints], run.train_losses,
                  run.test_losses, torch.tensor([c.learning_rate for c in run.checkpoints], dtype=torch.float64))

    def lds(scores: np.ndarray) -> float:
        return linear_datamodeling_score(scores, run.holdout_masks, run.holdout_test_losses).mean

    names = [n for n, _ in TokenLM(case.recipe).named_parameters()]
    last_mlp = [n for n in names if n.startswith((f"lm.transformer.h.{case.recipe.n_layer - 1}.mlp.",
                                                    "lm.transformer.ln_f."))]
    evaluate_train_test(report, case.name, TrainTestSubject(z0, run.checkpoints, run.access(), names, last_mlp,
                                                            {"TracInCP": run.tracincp}), lds)


def forward_access(run: TrainResult) -> ForwardAccess:
    """What random directions need from a run: its model factory and data, as the pipeline rebuilds them."""
    train_split, test_split = run.bundle.train, run.bundle.test
    return ForwardAccess(lambda: build_model(run.model_spec), (train_split.features, train_split.labels),
                         (test_split.features, test_split.labels), cross_entropy_per_example)



# ---------------------------------------------------------------------------------------------
# The flag count: the default queue against the injected flips, beside cleanlab; clean twins
# ---------------------------------------------------------------------------------------------


def _f1(flagged: np.ndarray, flipped: np.ndarray) -> float:
    hits = int((flagged & flipped).sum())
    return 2 * hits / (int(flagged.sum()) + int(flipped.sum())) if hits else 0.0


# The count methods compared on the suite (the default first); the others' F1 and clean-twin share go into
# the ``count_methods`` section, beside the held-out excess alone (no extension by confident learning).
COUNT_METHODS = ("held_out", "confident", "mixture")


def best_f1(run: TrainResult, flipped: np.ndarray) -> float:
    """The highest F1 the default flag score's ranking reaches at any count: what a perfect count would give."""
    losses = read_loss_table(run.train_losses)
    score = flag_score(pd.DataFrame(loss_signals(losses.values.double())), FlagPolicy().score)
    hits = np.cumsum(flipped[np.argsort(-score, kind="stable")])
    return float((2 * hits / (np.arange(1, len(score) + 1) + flipped.sum())).max())


def run_queues(run: TrainResult) -> dict[str, np.ndarray]:
    """Each count method's flags on a run (its loss-table signals, labels and held-out table, no reviewed
    ancestor), and ``excess``: the held-out excess alone, highest flag score first."""
    losses = read_loss_table(run.train_losses)
    if not np.array_equal(losses.example_ids, run.bundle.train.example_ids):
        raise RuntimeError("loss table columns are not in the run's example order")
    frame = pd.DataFrame(loss_signals(losses.values.double()))
    tables = tuple(pd.read_parquet(path) for path in (run.train_losses, run.test_losses))
    labels = run.bundle.train.labels.numpy()
    queues = {method: flag_scores(frame, FlagPolicy(method=method), labels=labels, loss_tables=tables).flagged
              for method in COUNT_METHODS}
    score = flag_score(frame, FlagPolicy().score)
    queues["excess"] = np.isin(np.arange(len(score)), np.argsort(-score, kind="stable")[:held_out_excess(*tables).excess])
    return queues


def evaluate_counts(report: Report, case: Case, run: TrainResult, work: Path, cache: Path) -> None:
    """Section ``counts``: the default queue's size and F1 against the injected flips beside cleanlab's
    (its own count, 5-fold out-of-fold as in the peers), and for a noisy case the same recipe trained on
    clean labels from scratch (no reviewed ancestor): how many it flags, as a share and against its twin.
    Section ``count_methods``: the same for every compared count method."""
    flipped = np.isin(run.bundle.train.example_ids, run.bundle.flipped_ids)
    queues = run_queues(run)
    queue = queues[COUNT_METHODS[0]]
    row = dict(case=case.name, train_examples=len(flipped), flips=int(flipped.sum()), queue_flagged=int(queue.sum()))
    if case.noisy:
        _, cleanlab, _ = cleanlab_scores(run, cache)
        twin = train(case.config.replace(label_noise=0.0), work / f"clean-twin-{len(report.sections.get('counts', []))}")
        twin_queues = run_queues(twin)
        clean_flagged = int(twin_queues[COUNT_METHODS[0]].sum())
        row.update(queue_f1=_f1(queue, flipped), best_f1_any_count=best_f1(run, flipped), cleanlab_flagged=int(cleanlab.sum()),
                   cleanlab_f1=_f1(cleanlab.astype(bool), flipped), clean_twin_flagged=clean_flagged,
                   clean_twin_rate=clean_flagged / len(flipped), clean_vs_noisy=clean_flagged / max(int(queue.sum()), 1))
        for method, flags in queues.items():
            report.add("count_methods", quiet=True, case=case.name, method=method, flagged=int(flags.sum()),
                       f1=_f1(flags, flipped), clean_twin_rate=int(twin_queues[method].sum()) / len(flipped))
    else:
        row.update(clean_rate=int(queue.sum()) / len(flipped))
        for method, flags in queues.items():
            report.add("count_methods", quiet=True, case=case.name, method=method, flagged=int(flags.sum()),
                       clean_rate=int(flags.sum()) / len(flipped))
    report.add("counts", **row)


def count_lines(report: Report) -> list[str]:
    """The count targets: queue F1 >= cleanlab's on every noisy case; a clean run flags <= 1/3 of its noisy
    twin and <= 3% of its training set."""
    counts = report.frame("counts")
    if counts.empty:
        return []
    noisy = counts[counts["flips"] > 0]
    lines = []
    if len(noisy):
        missed = noisy[noisy["queue_f1"] < noisy["cleanlab_f1"]]
        lines.append("- default queue F1 >= cleanlab's (own count, 5-fold out-of-fold) on every noisy case: "
                     + ("met" if missed.empty else "MISSED on " + "; ".join(
                         f"{r.case} ({r.queue_f1:.3f} vs {r.cleanlab_f1:.3f})" for r in missed.itertuples()))
                     + f" (mean {noisy['queue_f1'].mean():.3f} vs {noisy['cleanlab_f1'].mean():.3f})")
        bad = noisy[(noisy["clean_twin_rate"] > 0.03) | (noisy["clean_vs_noisy"] > 1 / 3)]
        lines.append("- clean twin flags <= 1/3 of its noisy run and <= 3% of its training set: "
                     + ("met" if bad.empty else "MISSED on " + "; ".join(
                         f"{r.case} ({r.clean_twin_flagged} = {r.clean_twin_rate:.1%}, {r.clean_vs_noisy:.2f}x)"
                         for r in bad.itertuples()))
                     + f" (worst rate {noisy['clean_twin_rate'].max():.1%})")
    clean = counts[counts["flips"] == 0]
    if len(clean):
        over = clean[clean["clean_rate"] > 0.03]
        lines.append("- clean suite cases flag <= 3%: " + ("met" if over.empty else "MISSED on " + "; ".join(
            f"{r.case} ({r.queue_flagged} = {r.clean_rate:.1%})" for r in over.itertuples())))
    return lines


def counts_only(out: Path, cache: Path, cases: int | None) -> Report:
    """``--counts``: recompute the ``counts`` section alone into the folder's accuracy.json (cheap: one
    training per case, its clean twin and cleanlab's 5 cached folds)."""
    path = out / "accuracy.json"
    saved = json.loads(path.read_text()) if path.is_file() else {"sections": {}, "notes": {}}
    report = Report(saved["sections"], saved["notes"])
    report.sections["counts"] = []
    report.sections["count_methods"] = []
    with tempfile.TemporaryDirectory(prefix="z0inf-counts.") as tmp:
        for index, case in enumerate(CASES[:cases]):
            run = train(case.config, Path(tmp) / f"case-{index}")
            evaluate_counts(report, case, run, Path(tmp), cache)
    path.write_text(json.dumps({"sections": report.sections, "notes": report.notes}, indent=1, default=float))
    return report


# ---------------------------------------------------------------------------------------------
# Defaults from the suite mean, and whether the targets are met
# ---------------------------------------------------------------------------------------------


def choose_defaults(report: Report) -> dict:
    """Z0's window, k, eta and centring by the suite-mean Spearman against SSRT; the flag score by the
    suite-mean AUPRC over the noisy cases (loss-table signals do not depend on the window). Never one case."""
    grid = report.frame("z0_grid")
    keys = ["warmup", "k", "eta", "center", "rule"]
    means = grid.groupby(keys)["spearman"].mean().sort_values(ascending=False)
    warmup, k, eta, center, rule = means.index[0]
    signals = report.frame("signals")
    noisy = signals[signals["auprc"].notna()] if "auprc" in signals else signals[:0]
    flag_means = noisy.groupby("score")["auprc"].mean().sort_values(ascending=False)
    singles = flag_means[flag_means.index.isin(SIGNAL_COLUMNS)]
    return {"warmup_fraction": float(warmup), "neighbors": int(k), "eta": eta, "center_losses": bool(center),
            "neighbor_rule": rule,
            "z0_mean_spearman": float(means.iloc[0]),
            "flag_score": singles.index[0] if len(singles) else None,
            "best_flag_score_any": flag_means.index[0] if len(flag_means) else None}


def coded_defaults() -> dict:
    return {"warmup_fraction": DEFAULT_ARGS.warmup_fraction, "neighbors": DEFAULT_ARGS.neighbors,
            "eta": DEFAULT_ARGS.eta, "center_losses": DEFAULT_ARGS.center_losses,
            "neighbor_rule": DEFAULT_ARGS.neighbor_rule, "flag_score": FlagPolicy().score}


def per_case_tables(report: Report) -> dict[str, pd.DataFrame]:
    """Per case + suite mean: Spearman, LDS, AUPRC and AUROC at the coded defaults, beside the peers."""
    coded = coded_defaults()
    cases = [r["case"] for r in report.sections["cases"]]
    signals = report.frame("signals")
    at = signals
    grid = report.frame("z0_grid")
    z0 = grid[(grid["warmup"] == coded["warmup_fraction"]) & (grid["k"] == coded["neighbors"])
              & (grid["eta"] == coded["eta"]) & (grid["center"] == coded["center_losses"])
              & (grid["rule"] == coded["neighbor_rule"])].set_index("case")
    peers = report.frame("peers")
    tables = {}
    for metric in ("spearman", "auprc", "auroc"):
        if metric not in at:
            continue
        columns = {c: at[at["score"] == c].set_index("case")[metric] for c in SIGNAL_COLUMNS}
        columns["self_influence"] = z0[metric]  # the grid holds every setting: the coded one, whatever ran
        if coded["flag_score"] not in SIGNAL_COLUMNS:
            columns[f"flag score {coded['flag_score']}"] = at[at["score"] == coded["flag_score"]].set_index("case")[metric]
        for method in ("TracInCP", "cleanlab"):
            rows = peers[peers["method"] == method].set_index("case")
            if metric in rows:
                columns[method] = rows[metric]
        if metric == "spearman":
            columns["SSRT split-half (ceiling)"] = report.frame("cases").set_index("case")["ssrt_split_half"]
        table = pd.DataFrame({k: v for k, v in columns.items() if v is not None}).reindex(cases)
        if metric != "spearman":
            table = table[[c in set(peers.loc[peers["method"] == "cleanlab", "case"]) for c in table.index]]
        tables[metric] = _with_mean(table)
    return tables


def train_test_cases(report: Report) -> list[str]:
    return [r["case"] for r in report.sections.get("cases", [])] + [r["case"] for r in report.sections.get("lm_cases", [])]


def _suite_best(frame: pd.DataFrame, keys: list[str], cases: list[str]) -> tuple[pd.Series, tuple]:
    """Suite-mean LDS of every setting measured on every case, best first, and the best setting."""
    frame = frame[frame["case"].isin(cases)]
    complete = frame.groupby(keys)["case"].nunique() == len(cases)
    means = frame.groupby(keys)["lds"].mean()[complete].sort_values(ascending=False)
    return means, means.index[0]


def choose_train_test(report: Report) -> dict:
    """Train-test settings by suite-mean LDS (classification and LM cases), apart from the self-influence
    choice: the trajectory's window, k and rule; random directions' P, checkpoints, eta and trajectory
    weight; and the forward-only method with the higher mean. Never one case."""
    cases = train_test_cases(report)
    trajectory = report.frame("z0_lds")
    trajectory = trajectory[~trajectory["center"] & ~trajectory["weight"]]
    t_means, (warmup, k, rule) = _suite_best(trajectory, ["warmup", "k", "rule"], cases)
    d_means, (parameters, P, C, eta, weight) = _suite_best(
        report.frame("directions_lds"), ["parameters", "P", "C", "eta", "trajectory_weight"], cases)
    return {"trajectory": {"warmup_fraction": float(warmup), "neighbors": int(k), "neighbor_rule": rule,
                           "lds": float(t_means.iloc[0])},
            "directions": {"parameters": parameters, "directions": int(P), "direction_checkpoints": int(C), "eta": eta,
                           "trajectory_weight": float(weight), "lds": float(d_means.iloc[0])},
            "method": "directions" if d_means.iloc[0] >= t_means.iloc[0] else "trajectory"}


def coded_train_test() -> dict:
    tt = DEFAULT_TRAIN_TEST
    # InfluenceArguments.parameters (a glob list; None: all) is shared with the Gram: the suite's subset setting,
    # "last layer", names a different layer per model, so only "all" can be a coded default
    return {"method": tt.method, "parameters": "all" if DEFAULT_ARGS.parameters is None else DEFAULT_ARGS.parameters,
            "warmup_fraction": tt.warmup_fraction, "neighbors": tt.neighbors,
            "neighbor_rule": tt.neighbor_rule, "eta": tt.eta, "directions": tt.directions,
            "direction_checkpoints": tt.direction_checkpoints, "trajectory_weight": tt.trajectory_weight}


def train_test_tables(report: Report) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(LDS, cost) per case and the suite mean: trajectory-only Z0 at the self-influence defaults and at the
    LDS-chosen ones, random directions at every P (other settings as chosen), and the peers."""
    cases = train_test_cases(report)
    choice = choose_train_test(report)["directions"]
    t = report.frame("z0_lds")
    t = t[~t["center"] & ~t["weight"]]
    chosen_t = choose_train_test(report)["trajectory"]

    def trajectory_at(warmup, k, rule) -> pd.DataFrame:
        rows = t[(t["warmup"] == warmup) & (t["rule"] == rule)]
        # a case with fewer checkpoints in the window uses every other one (as the analysis clamps k)
        return rows.sort_values("k").groupby("case").apply(
            lambda g: g[g["k"] <= k].iloc[-1] if (g["k"] <= k).any() else g.iloc[0], include_groups=False)

    columns, costs = {}, {}
    si = trajectory_at(DEFAULT_ARGS.warmup_fraction, DEFAULT_ARGS.neighbors, DEFAULT_ARGS.neighbor_rule)
    columns["Z0 trajectory (self-influence defaults)"] = si["lds"]
    lds_chosen = trajectory_at(chosen_t["warmup_fraction"], chosen_t["neighbors"], chosen_t["neighbor_rule"])
    label = f"Z0 trajectory (LDS-chosen: window {chosen_t['warmup_fraction']}, k={chosen_t['neighbors']}, {chosen_t['neighbor_rule']})"
    columns[label], costs[label + " s"], costs[label + " MiB"] = lds_chosen["lds"], lds_chosen["seconds"], lds_chosen["mib"]
    d = report.frame("directions_lds")
    for P in DIRECTION_COUNTS[choice["parameters"]]:
        rows = d[(d["P"] == P) & (d["C"] == choice["direction_checkpoints"]) & (d["eta"] == choice["eta"])
                 & (d["trajectory_weight"] == choice["trajectory_weight"])
                 & (d["parameters"] == choice["parameters"])].set_index("case")
        label = f"directions P={P}"
        columns[label], costs[label + " s"], costs[label + " MiB"] = rows["lds"], rows["seconds"], rows["mib"]
    peers = report.frame("train_test")
    for method in ("TracInCP", "TRAK"):
        rows = peers[peers["method"] == method].set_index("case")
        columns[method], costs[method + " s"], costs[method + " MiB"] = rows["lds"], rows["seconds"], rows["mib"]
    lds = _with_mean(pd.DataFrame(columns).reindex(cases))
    cost = _with_median(pd.DataFrame(costs).reindex(cases))
    return lds, cost


def train_test_targets(report: Report, lds: pd.DataFrame, cost: pd.DataFrame) -> list[str]:
    """The issue's train-test targets for the coded default, met or with their gaps in figures."""
    coded = coded_train_test()
    column = (f"directions P={coded['directions']}" if coded["method"] == "directions"
              else next(c for c in lds.columns if c.startswith("Z0 trajectory (LDS")))
    lines = []
    if column not in lds:
        return [f"- the coded default ({coded}) was not measured in this run"]
    ours, tracin = lds.at["suite mean", column], lds.at["suite mean", "TracInCP"]
    lines.append(f"- default train-test method ({column}) suite-mean LDS {ours:.3f} >= TracInCP's {tracin:.3f}: "
                 + ("met" if ours >= tracin else f"MISSED by {tracin - ours:.3f}"))
    lm_names = [r["case"] for r in report.sections.get("lm_cases", [])]
    for case in lm_names:
        a, b = lds.at[case, column], lds.at[case, "TracInCP"]
        lines.append(f"- on {case}: LDS {a:.3f} vs TracInCP {b:.3f}: " + ("met" if a >= b else f"MISSED by {b - a:.3f}"))
    slower = [(c, cost.at[c, column + " s"], cost.at[c, "TracInCP s"]) for c in lds.index[:-1]
              if column + " s" in cost and cost.at[c, column + " s"] > cost.at[c, "TracInCP s"]]
    lines.append("- wall time <= TracInCP's on each case: " + ("met" if not slower else "MISSED on " + "; ".join(
        f"{c} ({a:.1f} s vs {b:.1f} s)" for c, a, b in slower)))
    return lines


def _with_median(table: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([table, table.median(axis=0).to_frame("median").T])


def _with_mean(table: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([table, table.mean(axis=0).to_frame("suite mean").T])


def targets(report: Report, tables: dict[str, pd.DataFrame]) -> list[str]:
    """Each target of the issue, met or with its gap in figures."""
    coded = coded_defaults()
    lines = []
    auprc = tables.get("auprc")
    if auprc is not None:
        column = coded["flag_score"] if coded["flag_score"] in auprc else f"flag score {coded['flag_score']}"
        per_case = auprc.drop(index="suite mean")
        for peer in ("cleanlab", "TracInCP"):
            gaps = per_case[column] - per_case[peer]
            missed = gaps[gaps < 0]
            lines.append(f"- flag score `{coded['flag_score']}` AUPRC >= {peer} on every noisy case: "
                         + ("met" if missed.empty else "MISSED on " + "; ".join(
                             f"{c} ({per_case.at[c, column]:.3f} vs {per_case.at[c, peer]:.3f}, gap {g:.3f})"
                             for c, g in missed.items()))
                         + f" (min margin {gaps.min():+.3f})")
        singles = auprc.loc["suite mean", list(SIGNAL_COLUMNS)]
        best = singles.idxmax()
        ours = auprc.at["suite mean", column]
        lines.append(f"- flag score suite-mean AUPRC {ours:.3f} >= best single signal's ({best}, {singles.max():.3f})"
                     f" - 0.01: {'met' if ours >= singles.max() - 0.01 else 'MISSED by %.3f' % (singles.max() - 0.01 - ours)}")
    spear = tables["spearman"]
    z0, tracin = spear.at["suite mean", "self_influence"], spear.at["suite mean", "TracInCP"]
    lines.append(f"- Z0 finite-difference at its defaults, mean Spearman vs SSRT {z0:.3f} >= TracInCP's {tracin:.3f}: "
                 + ("met" if z0 >= tracin else f"MISSED by {tracin - z0:.3f}"))
    return lines


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def count_table(report: Report) -> str:
    """Per case: flips, the default queue's size and F1, cleanlab's, and the clean twin's flags; then the mean."""
    counts = report.frame("counts")
    if counts.empty:
        return "not measured (run with --counts)"
    table = _with_mean(counts.set_index("case").drop(columns=["train_examples"]).astype(float))
    shown = table.copy().astype(object)
    for column in [c for c in table if c in ("flips", "queue_flagged", "cleanlab_flagged", "clean_twin_flagged")]:
        shown[column] = [f"{v:.0f}" if v == v else "n/a" for v in table[column]]
    return markdown(shown)


def count_method_table(report: Report) -> str:
    """Per count method: mean F1 over the noisy cases, how many of them reach cleanlab's F1, the worst
    clean-twin share and the worst clean-case share (the suite mean chooses the default)."""
    methods, counts = report.frame("count_methods"), report.frame("counts")
    if methods.empty:
        return "not measured (run with --counts)"
    cleanlab = counts.set_index("case")["cleanlab_f1"]
    rows = {}
    methods = methods.reindex(columns=[*methods.columns.drop(["f1", "clean_twin_rate", "clean_rate"], errors="ignore"),
                                       "f1", "clean_twin_rate", "clean_rate"])
    for method, group in methods.groupby("method", sort=False):
        noisy = group.dropna(subset=["f1"]).set_index("case")
        clean = group[group["f1"].isna()]
        rows[method] = {"mean_f1": noisy["f1"].mean(),
                        "cases_at_or_above_cleanlab": f"{int((noisy['f1'] >= cleanlab[noisy.index]).sum())} of {len(noisy)}",
                        "worst_twin_rate": noisy["clean_twin_rate"].max(), "worst_clean_case_rate": clean["clean_rate"].max()}
    rows["cleanlab (own count)"] = {"mean_f1": cleanlab.dropna().mean(), "cases_at_or_above_cleanlab": "-",
                                    "worst_twin_rate": float("nan"), "worst_clean_case_rate": float("nan")}
    return markdown(pd.DataFrame(rows).T, index="count")


def markdown(frame: pd.DataFrame, index: str | None = "case") -> str:
    frame = frame.reset_index().rename(columns={"index": index}) if index else frame

    def cell(value) -> str:
        if isinstance(value, (float, np.floating)):
            return "n/a" if np.isnan(value) else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(str(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_markdown(report: Report, out: Path, quick: bool, total_seconds: float) -> Path:
    tables = per_case_tables(report)
    chosen, coded = report.notes["suite_choice"], coded_defaults()
    grid = report.frame("z0_grid")
    grid_means = grid.groupby(["warmup", "k", "eta", "center", "rule"]).agg(
        spearman=("spearman", "mean"), **({"auprc": ("auprc", "mean")} if "auprc" in grid else {})
    ).sort_values("spearman", ascending=False).reset_index()
    signals = report.frame("signals")
    flag_means = (signals.groupby("score")
                  .agg(auprc=("auprc", "mean"), auroc=("auroc", "mean"), spearman=("spearman", "mean"))
                  .sort_values("auprc", ascending=False).reset_index()) if "auprc" in signals else pd.DataFrame()
    agrees = all(coded[k] == chosen[k] for k in coded)
    tt_lds, tt_cost = train_test_tables(report)
    tt_choice = choose_train_test(report)
    cases = train_test_cases(report)
    tt = report.frame("z0_lds")
    tt_traj_means, _ = _suite_best(tt[~tt["center"] & ~tt["weight"]], ["warmup", "k", "rule"], cases)
    tt_dir_means, _ = _suite_best(report.frame("directions_lds"), ["parameters", "P", "C", "eta", "trajectory_weight"],
                                  cases)
    coded_tt = coded_train_test()
    tt_agrees = (coded_tt["method"] == tt_choice["method"]
                 and all(coded_tt[k] == v for k, v in tt_choice["trajectory"].items() if k != "lds")
                 and all(coded_tt[k] == v for k, v in tt_choice["directions"].items() if k != "lds"))
    text = f"""# Accuracy of every zeroth-order signal on a suite of {len(tables['spearman']) - 1} problems

Written by `nice -n 10 python benchmarks/accuracy.py{' --quick' if quick else ''}` in {total_seconds:.0f} s on
{platform.machine()} with {torch.get_num_threads()} torch thread(s) (torch {torch.__version__}); SSRT from
{report.notes['ssrt_models']} models per case (p = 0.5), LDS over {report.notes['holdout_models']} held-out halves.
Tables are at the library's coded defaults: window warm-up fraction {coded['warmup_fraction']}, k = {coded['neighbors']},
eta = {coded['eta']}, center_losses = {coded['center_losses']}; flag score `{coded['flag_score']}`.

## Cases

{markdown(report.frame('cases'), None)}

## Self-influence: Spearman against SSRT self-influence (every signal oriented: higher = more suspicious)

`self_influence` is Z0 finite-difference at the coded defaults; the loss-table signals use every checkpoint.

{markdown(tables['spearman'])}

## Train-test attribution: LDS per method (classification and LM cases)

LM cases (tiny GPT-2, copy-pretrained, fine-tuned on another task; `lm_cases.py`), held-out answer
accuracy of the fine-tuned model:

{markdown(report.frame('lm_cases'), None) if 'lm_cases' in report.sections else 'not run'}

{markdown(tt_lds)}

Wall time (s) and peak memory above the start (MiB, resident, sampled every 2 ms) of the same
computations; directions at P < the largest are scaled from the largest pass (cost is linear in P x C):

{markdown(tt_cost)}

Train-test settings by suite-mean LDS (apart from the self-influence choice), top 8 of each:

{markdown(tt_traj_means.head(8).reset_index(), None)}

{markdown(tt_dir_means.head(8).reset_index(), None)}

Suite choice: {json.dumps(tt_choice)}; coded train-test defaults {'equal' if tt_agrees else 'DIFFER from'} the choice: {json.dumps(coded_train_test())}.

## Label-noise detection: AUPRC (noisy cases)

{markdown(tables['auprc']) if 'auprc' in tables else 'no noisy case'}

## Label-noise detection: AUROC (noisy cases)

{markdown(tables['auroc']) if 'auroc' in tables else 'no noisy case'}

## Flag count: the default queue against the injected flips, beside cleanlab

{count_table(report)}

Every count method compared on the same runs (`held_out` is the default; `excess` is the held-out excess
alone, without the extension by confident learning):

{count_method_table(report)}

## How the defaults were chosen (suite means, never one case)

Z0-Inf settings by suite-mean Spearman against SSRT self-influence (AUPRC: mean over the noisy cases);
best first, top 12 of {len(grid_means)}:

{markdown(grid_means.head(12), None)}

Flag-score candidates (Z0 finite-difference at the coded defaults), by suite-mean AUPRC over the
noisy cases (a `a+b` score is the mean of the two signals' suspicion ranks), top 12:

{markdown(flag_means.head(12), None) if len(flag_means) else 'no noisy case'}

Suite choice: window warm-up {chosen['warmup_fraction']}, k = {chosen['neighbors']} ({chosen['neighbor_rule']}), eta = {chosen['eta']},
center_losses = {chosen['center_losses']} (mean Spearman {chosen['z0_mean_spearman']:.3f}); flag score (single signals,
so that a cut-off keeps its meaning across runs) `{chosen['flag_score']}`; best of all candidates `{chosen['best_flag_score_any']}`.
Coded defaults {'equal the suite choice' if agrees else 'DIFFER from the suite choice: ' + json.dumps(coded)}.

## Targets

""" + "\n".join(targets(report, tables) + train_test_targets(report, tt_lds, tt_cost) + count_lines(report)) + "\n"
    path = out / "accuracy.md"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few models per case: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results, "
                        "or benchmarks/results/cache/quick with --quick)")
    parser.add_argument("--cache", type=Path, default=RESULTS / "cache" / "retrain",
                        help="where retrained models are cached by config hash")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for these tiny models on a shared 2-core box)")
    parser.add_argument("--cases", type=int, default=None, help="only the first n cases")
    parser.add_argument("--only", default=None, help="only the classification cases whose name contains this "
                        "text (no LM case): run parts of the suite in parallel, then --merge their results")
    parser.add_argument("--merge", type=Path, nargs="+", default=(),
                        help="with --report-only: results (accuracy.json) of other runs of the same code, whose cases "
                        "replace the folder's rows of the same case")
    parser.add_argument("--lm-only", action="store_true",
                        help="run only the LM cases and merge their rows into the folder's accuracy.json")
    parser.add_argument("--lm-case", type=int, default=None, help="with --lm-only: only this LM case (0-based)")
    parser.add_argument("--counts", action="store_true",
                        help="only the flag-count section (queue and cleanlab F1, clean twins), into the existing results")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite accuracy.md from the folder's accuracy.json (after changing a default)")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else Scale()
    out = args.out or (RESULTS / "cache" / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("trak").setLevel(logging.ERROR)
    if args.counts:
        report = counts_only(out, args.cache, args.cases)
        if "suite_choice" in report.notes:
            write_markdown(report, out, args.quick, report.notes["total_seconds"])
        print(count_table(report), count_method_table(report), *count_lines(report), sep="\n")
        return 0
    if args.report_only:
        saved = json.loads((out / "accuracy.json").read_text())
        report = Report(saved["sections"], saved["notes"])
        for path in args.merge:
            other = json.loads(path.read_text())["sections"]
            names = {r["case"] for rows in other.values() for r in rows if "case" in r}
            for section in set(report.sections) | set(other):
                kept = [r for r in report.sections.get(section, []) if r.get("case") not in names]
                report.sections[section] = kept + other.get(section, [])
            report.notes["merged"] = [*report.notes.get("merged", []), str(path)]
        if args.merge:
            report.notes["suite_choice"] = choose_defaults(report)
            json_path = out / "accuracy.json"
            json_path.write_text(json.dumps({"sections": report.sections, "notes": report.notes}, indent=1,
                                            default=float))
        print(write_markdown(report, out, args.quick, report.notes["total_seconds"]).read_text())
        return 0
    from lm_cases import LM_CASES

    report = Report(notes={"ssrt_models": scale.ssrt_models, "holdout_models": scale.holdout_models})
    if args.lm_only and (out / "accuracy.json").is_file():
        saved = json.loads((out / "accuracy.json").read_text())
        names = {c.name for c in LM_CASES}
        report = Report({k: [r for r in rows if r.get("case") not in names] for k, rows in saved["sections"].items()},
                        saved["notes"])
    start = time.perf_counter()
    json_path = out / "accuracy.json"

    def save() -> None:  # after every case: a long run that is stopped keeps what it measured
        json_path.write_text(json.dumps({"sections": report.sections, "notes": report.notes}, indent=1, default=float))

    with tempfile.TemporaryDirectory(prefix="z0inf-accuracy.") as tmp:
        classifiers = [] if args.lm_only else [c for c in CASES[: args.cases] if args.only is None or args.only in c.name]
        lms = list(LM_CASES) if args.lm_only or (args.cases is None and args.only is None) else []
        lms = lms if args.lm_case is None else [LM_CASES[args.lm_case]]
        # the CNN case last: its 2 P C forward passes of random directions take longest on a shared CPU
        cnn = [c for c in classifiers if c.config.model == "cnn"]
        for case in [c for c in classifiers if c not in cnn] + lms + cnn:
            with Stopwatch() as clock:
                if isinstance(case, Case):
                    evaluate_case(report, case, Path(tmp), args.cache, scale)
                else:
                    evaluate_lm_case(report, case, Path(tmp) / f"lm-{lms.index(case)}", scale)
            print(f"== {case.name}: {clock.seconds:.0f} s", flush=True)
            save()
    total = time.perf_counter() - start
    report.notes["total_seconds" if not args.lm_only else "lm_seconds"] = total
    total = report.notes.get("total_seconds", total)
    report.notes["suite_choice"] = choose_defaults(report)
    save()
    md = write_markdown(report, out, args.quick, total)
    print(md.read_text())
    print(f"wrote {md} and {json_path} ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
