"""One run's influence analysis: the object the CLI and the Dagster assets both drive.

It owns the inputs (checkpoints, loss tables), validates that they belong together, computes
the Gram matrix once and returns tidy frames ready to be written as parquet.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar, Iterable, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from .atomic import atomic_output
from .checkpoints import Checkpoint, checkpoint_fingerprint, open_checkpoints, select_parameters
from ..errors import InputError
from .directions import DIRECTION_BATCH, ForwardAccess, direction_checkpoint_positions, direction_features
from .tracin import tracincp_features
from .trak import trak_checkpoint_positions, trak_features
from .estimators import (
    InfluenceFactors,
    NeighborRule,
    combine_standardised,
    influence_features,
    self_influence,
    topk_of_factor_chunks,
    warmup_window,
)
from .gram import gram_matrix
from .loss_tables import LossTable, read_loss_table, step_column
from .signals import LossKind, loss_signals
from ..arguments import Settings

_PROVENANCE_KEY = "z0inf.gram_provenance"
# |G - G^T| allowed, relative to the largest squared norm: float64 products summed in another order.
_SYMMETRY_TOLERANCE = 1e-9


class NeighborsClampedWarning(UserWarning):
    """The run has fewer checkpoints in its window than ``neighbors + 1``: k was lowered to fit."""


class GramArguments(Settings):
    """Which weights enter the Gram matrix G = W W^T."""

    owner: ClassVar[str] = "influence arguments"

    parameters: list[str] | None = Field(
        None,
        description="only tensors whose name matches one of these globs, e.g. '3.*' (the last layer of the default "
        "MLP); unset: every tensor",
    )
    center: bool = Field(True, description="subtract the first checkpoint from every checkpoint's weights before W W^T")


class WindowArguments(Settings):
    """Which checkpoints, pairs and step weights an estimate uses."""

    owner: ClassVar[str] = "influence arguments"

    neighbors: int = Field(
        12,
        ge=1,
        description="k neighbouring checkpoints per checkpoint (a window of at most k checkpoints uses all the "
        "others, with a warning)",
    )
    neighbor_rule: NeighborRule = Field("distance", description="neighbours nearest in parameter distance, or in training order")
    eta: Literal["uniform", "learning_rate"] = Field(
        "uniform", description="per-checkpoint weights: uniform, or the recorded learning rate"
    )
    warmup_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Z0 finite-difference and train-test influence leave out checkpoints before this fraction of "
        "training (by step): the initialisation and the first transient, where every example's loss falls at "
        "once; 0 keeps all",
    )


class LossArguments(Settings):
    """How the loss trajectories are read."""

    owner: ClassVar[str] = "influence arguments"

    center_losses: bool = Field(
        False, description="subtract each checkpoint's mean loss over examples before taking differences"
    )
    weight_by_correlation: bool = Field(
        False, description="train-test: multiply INF(i, z) by the Spearman correlation of the two loss trajectories"
    )
    loss_kind: LossKind = Field(
        "cross_entropy", description="the loss in the tables; confidence and variability (exp(-loss)) need cross_entropy"
    )


class TopKArguments(Settings):
    """How much of train-test influence is kept."""

    owner: ClassVar[str] = "influence arguments"

    topk: int = Field(10, ge=1, description="proponents and opponents kept per test example")


class InfluenceArguments(TopKArguments, LossArguments, WindowArguments, GramArguments):
    """How to estimate: every concept above in one object, which the core reads. The CLI and the
    launchpad show each concept where it applies (``cli/influence.py``, ``defs/config.py``)."""


TrainTestMethod = Literal["directions", "trajectory", "tracincp", "trak"]


class TrainTestArguments(Settings):
    """How train-test influence is estimated: its defaults are chosen on the suite's mean LDS
    (``benchmarks/accuracy.py``), separately from the self-influence settings of ``InfluenceArguments``
    (chosen on Spearman against SSRT), so no train-test default follows from the self-influence choice.

    ``directions``: forward passes along P random directions at a few checkpoints (a zeroth-order
    TracInCP, ``influence.directions``), plus ``trajectory_weight`` x the trajectory term (both standardised per
    test example, ``estimators.combine_standardised``); it needs the
    run's model and data and falls back to ``trajectory`` (said in the output's metadata) without them.
    ``trajectory``: Z0-Inf's trajectory directions only. ``tracincp`` (opt-in, not zeroth-order): exact
    per-example gradients at every checkpoint, learning-rate weighted (``influence.tracin``); it needs the
    model and data as ``directions`` does. ``trak`` (opt-in, not zeroth-order, classifiers only): TRAK through the
    ``traker`` package at a few late checkpoints (``influence.trak``); it needs the model and data too, and
    refuses a text run by name. The CLI spells ``warmup_fraction`` ``--window``."""

    owner: ClassVar[str] = "train-test arguments"

    method: TrainTestMethod = Field(
        "directions",
        description="directions: forward passes along random directions (needs the run's model and data; else "
        "falls back to trajectory); trajectory: checkpoint differences only; tracincp: exact per-example gradients "
        "at every checkpoint (backward passes, memory N x D; needs the model, else falls back to trajectory); "
        "trak: TRAK (traker) on projected gradients, classification runs only (backward passes; needs the model, "
        "else falls back to trajectory)",
    )
    warmup_fraction: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="train-test leaves out checkpoints before this fraction of training (by step); its own "
        "setting, chosen on LDS",
    )
    neighbors: int = Field(1, ge=1, description="trajectory term: k neighbouring checkpoints per checkpoint")
    neighbor_rule: NeighborRule = Field(
        "order", description="trajectory term: neighbours nearest in training order, or in parameter distance"
    )
    eta: Literal["uniform", "learning_rate"] = Field(
        "uniform", description="per-checkpoint weights of train-test influence: uniform, or the recorded learning rate"
    )
    directions: int = Field(256, ge=1, description="random directions P per checkpoint (error ~ 1/sqrt(P))")
    direction_checkpoints: int = Field(
        2, ge=1, description="checkpoints perturbed, spread over the window, always the last"
    )
    step_size: float = Field(1e-3, gt=0.0, description="finite-difference step, relative to the RMS of the perturbed weights")
    distribution: Literal["rademacher", "gaussian"] = Field(
        "rademacher", description="law of the direction's entries (both have E[u u^T] = I)"
    )
    seed: int = Field(0, description="directions are regenerated from (seed, step, index), never stored; trak: "
                      "the projection's seed")
    trak_projection_dim: int = Field(
        256, ge=1, description="trak: random projection dimension k of each example's gradient (at most N)"
    )
    trak_checkpoints: int = Field(
        4, ge=1, description="trak: checkpoints used (one traker model each), spread over the second half of "
        "training, always the last"
    )
    trajectory_weight: float = Field(
        0.0, ge=0.0, description="directions: add this multiple of the trajectory term, both divided by the spread "
        "of their scores per test example (0: directions only)"
    )


@dataclass(frozen=True)
class GramProvenance:
    """What a Gram file was computed from: a reused Gram must come from the same checkpoints
    (steps and fingerprints), the same parameter tensors and the same centring, or its scores are wrong."""

    steps: tuple[int, ...]
    parameters: tuple[str, ...]
    center: bool
    fingerprints: tuple[str, ...]

    @classmethod
    def of(cls, checkpoints: Sequence[Checkpoint], parameters: Sequence[str], center: bool) -> "GramProvenance":
        return cls(tuple(c.step for c in checkpoints), tuple(parameters), bool(center),
                   tuple(checkpoint_fingerprint(c) for c in checkpoints))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "GramProvenance":
        raw = json.loads(text)
        return cls(tuple(int(s) for s in raw["steps"]), tuple(str(p) for p in raw["parameters"]),
                   bool(raw["center"]), tuple(str(f) for f in raw["fingerprints"]))

    def differences(self, other: "GramProvenance") -> list[str]:
        """What differs between the Gram's record (self) and the analysis (other), in words."""
        found = []
        if self.steps != other.steps:
            found.append(f"steps {list(self.steps)}, not the checkpoints' {list(other.steps)}")
        if self.parameters != other.parameters:
            found.append(f"parameters {list(self.parameters)}, not the selected {list(other.parameters)}")
        if self.center != other.center:
            found.append(f"center={self.center}, not {other.center}")
        changed = [s for s, a, b in zip(other.steps, self.fingerprints, other.fingerprints) if a != b]
        if self.steps == other.steps and changed:
            found.append(f"other checkpoint files at step(s) {changed} (fingerprints of the file bytes differ: "
                         "another run, or the same tensors saved with another header)")
        return found


class InfluenceAnalysis:
    """Checkpoints + loss tables of one training run -> Gram, self-influence, train-test top-k."""

    def __init__(
        self,
        checkpoints: str | os.PathLike | Sequence[str | os.PathLike | Checkpoint],
        train_losses: str | os.PathLike | LossTable,
        test_losses: str | os.PathLike | LossTable | None = None,
        args: InfluenceArguments = InfluenceArguments(),
        *,
        device: str | torch.device = "cpu",
        gram: torch.Tensor | str | os.PathLike | None = None,
        train_test: TrainTestArguments = TrainTestArguments(),
        forward: ForwardAccess | None = None,
    ) -> None:
        """``gram``: a precomputed Gram matrix, or a Gram parquet file (its steps must match the checkpoints).
        ``forward``: the run's model factory and data, for train-test influence along random directions;
        without it train-test influence is the trajectory's (``train_test_method`` says which ran)."""
        self.args = args
        self.train_test_args = train_test
        self.forward = forward
        self.device = torch.device(device)
        self.checkpoints = open_checkpoints(checkpoints)
        if len(self.checkpoints) < 2:
            raise InputError(f"Z0-Inf needs at least 2 checkpoints, got {len(self.checkpoints)}")
        self.parameter_names = select_parameters(self.checkpoints, args.parameters)
        self.steps = tuple(c.step for c in self.checkpoints)
        self.train = _load_table(train_losses, self.steps)
        self.test = None if test_losses is None else _load_table(test_losses, self.steps)
        if isinstance(gram, (str, os.PathLike)):
            gram = self._reusable_gram(gram)
        elif gram is not None:
            check_gram(gram, "gram")
        if gram is not None and tuple(gram.shape) != (len(self.steps),) * 2:
            raise InputError(f"gram: shape {tuple(gram.shape)} does not match {len(self.steps)} checkpoints")
        self._given_gram = gram

    @property
    def provenance(self) -> GramProvenance:
        """What this analysis's Gram is made of: written with the Gram file, checked when one is reused."""
        return GramProvenance.of(self.checkpoints, self.parameter_names, self.args.center)

    def _reusable_gram(self, path: str | os.PathLike) -> torch.Tensor:
        """A Gram file's matrix, refused unless its provenance record matches these checkpoints and settings."""
        steps, matrix, recorded = read_gram_file(path)
        if recorded is None:
            raise InputError(
                f"gram file {path}: records no provenance (checkpoints, parameters, centring), so it cannot be "
                "checked against these checkpoints; recompute it with `z0inf gram`"
            )
        differences = recorded.differences(self.provenance)
        if differences:
            raise InputError(f"gram file {path}: was computed from {'; '.join(differences)}")
        return matrix

    @cached_property
    def gram(self) -> torch.Tensor:
        if self._given_gram is not None:
            return self._given_gram.to(torch.float64)
        return gram_matrix(self.checkpoints, parameters=self.parameter_names, center=self.args.center, device=self.device)

    @cached_property
    def eta(self) -> torch.Tensor | None:
        return step_weights(self.checkpoints, self.args.eta)

    @cached_property
    def window(self) -> np.ndarray:
        """Positions of the checkpoints the estimators use (``warmup_fraction``)."""
        return warmup_window(self.steps, self.args.warmup_fraction)

    @cached_property
    def neighbors(self) -> int:
        """k as asked, at most every other checkpoint of the window: a short run (few checkpoints) uses
        all of them rather than failing; the clamp is announced with a warning."""
        return self._neighbors_within(self.window)

    def _neighbors_within(self, window: np.ndarray, neighbors: int | None = None) -> int:
        asked = self.args.neighbors if neighbors is None else neighbors
        available = len(window) - 1
        if asked > available:
            warnings.warn(
                f"neighbors={asked} but the checkpoint window holds {available + 1} checkpoints: "
                f"using k={available}",
                NeighborsClampedWarning,
                stacklevel=4,  # past functools' cached_property, to the estimate that asked
            )
        return min(asked, available)

    def _windowed(self, window: np.ndarray | None = None, eta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The Gram matrix and step weights restricted to a window (the self-influence ones unless given;
        a sub-block of G: the differences of the kept checkpoints do not depend on the others)."""
        keep = torch.from_numpy(self.window if window is None else window)
        eta = self.eta if window is None else eta
        return self.gram[keep][:, keep], None if eta is None else eta[keep]

    @property
    def train_test_method(self) -> tuple[str, str | None]:
        """(the train-test method that runs, why it is not the one asked for or None): random directions
        need the run's model and data; without them the trajectory answers."""
        asked = self.train_test_args.method
        if asked in ("directions", "tracincp", "trak") and self.forward is None:
            return "trajectory", ("the run has no model factory and data to run forward passes on (a contract "
                                  f"logged from an outside loop): trajectory-only Z0-Inf instead of {asked}")
        return asked, None

    def train_test_factors(self) -> InfluenceFactors:
        """INF(i, z) in factor form (``scores()`` forms any block): random directions at a few checkpoints
        plus ``trajectory_weight`` x the trajectory term, or the trajectory term alone (``train_test_method``)."""
        if self.test is None:
            raise InputError("train-test influence needs a test loss table")
        tt = self.train_test_args
        method, _ = self.train_test_method
        window = warmup_window(self.steps, tt.warmup_fraction)
        weights = step_weights(self.checkpoints, tt.eta)
        trajectory = None
        if method == "directions" and tt.trajectory_weight > 0 and self.args.weight_by_correlation:
            raise InputError("train-test: weight_by_correlation multiplies the trajectory term only; it "
                                      "cannot be combined with random directions (set trajectory_weight=0)")
        if method == "trajectory" or (method == "directions" and tt.trajectory_weight > 0):
            keep = torch.from_numpy(window)
            gram, eta = self._windowed(window, weights)
            trajectory = influence_features(
                gram, self.train.values[keep].to(self.device), self.test.values[keep].to(self.device),
                self._neighbors_within(window, tt.neighbors), eta, tt.neighbor_rule, self.args.center_losses,
                self.args.weight_by_correlation,
            )
        if method == "trajectory":
            return trajectory
        if method == "tracincp":
            recorded = all(c.learning_rate is not None for c in self.checkpoints)
            train, test = tracincp_features(self.forward, self.checkpoints, self.parameter_names,
                                            step_weights(self.checkpoints, "learning_rate") if recorded else None,
                                            device=self.device)
            return InfluenceFactors(train, test, None, None)
        if method == "trak":
            positions = trak_checkpoint_positions(tt.trak_checkpoints, len(self.checkpoints))
            train, test = trak_features(self.forward, [self.checkpoints[p] for p in positions], self.parameter_names,
                                        projection_dim=tt.trak_projection_dim, seed=tt.seed, device=self.device)
            return InfluenceFactors(train, test, None, None)
        train, test = train_test_direction_features(self.checkpoints, self.parameter_names, tt, self.forward,
                                                    device=self.device)
        directions = InfluenceFactors(train.to(self.device), test.to(self.device), None, None)
        if trajectory is None:
            return directions
        return combine_standardised(directions, trajectory, tt.trajectory_weight)

    def full_frame(self) -> pd.DataFrame:
        """The whole N x M matrix INF(i, z): rows ``example_id`` (training), one column per test example
        (its id as the column name). For measurement on small runs; the pipeline keeps top-k only."""
        scores = self.train_test_factors().scores().T.double().cpu().numpy()
        frame = pd.DataFrame(scores, columns=[str(i) for i in self.test.example_ids])
        frame.insert(0, "example_id", self.train.example_ids)
        return require_finite_scores(frame, frame.columns[1:], "example_id", "train")

    def gram_frame(self) -> pd.DataFrame:
        return gram_to_frame(self.steps, self.gram, self.provenance)

    def self_influence_frame(self) -> pd.DataFrame:
        """Every signal of every training example, one column each (``signals.SIGNAL_COLUMNS``).

        The checkpoint window is an option of the Z0 finite-difference estimator only: the loss-table
        signals (variance, mean, final loss, confidence, variability) always use every checkpoint.
        """
        gram, eta = self._windowed()
        scores = self_influence(
            gram, self.train.values[torch.from_numpy(self.window)].to(self.device), self.neighbors, eta,
            neighbor_rule=self.args.neighbor_rule, center_losses=self.args.center_losses,
        )
        frame = pd.DataFrame(
            {
                "example_id": self.train.example_ids,
                "self_influence": scores.double().cpu().numpy(),
                **loss_signals(self.train.values, self.args.loss_kind),
            }
        )
        return require_finite_scores(frame, ["self_influence", "variance_self_influence"], "example_id", "train")

    def topk_frame(self, factor_chunks: Iterable[InfluenceFactors] | None = None, *,
                   tile_rows: int | None = None) -> pd.DataFrame:
        """The top-k proponents and opponents of every test example, one row per (test example, rank).
        ``factor_chunks``: INF's factors computed elsewhere, in consecutive chunks of the training table's
        rows (the pipeline's projection shards, read one at a time; ``topk_of_factor_chunks``, tiles of
        ``tile_rows``); unset: ``train_test_factors()`` whole."""
        k = min(self.args.topk, len(self.train.example_ids))
        chunks = [self.train_test_factors()] if factor_chunks is None else factor_chunks
        top = topk_of_factor_chunks(chunks, k, len(self.train.example_ids), tile_rows=tile_rows)
        M = len(self.test.example_ids)
        train_ids = torch.from_numpy(self.train.example_ids)
        frame = pd.DataFrame(
            {
                "test_example_id": np.repeat(self.test.example_ids, k),
                "rank": np.tile(np.arange(1, k + 1), M),
                "proponent_id": train_ids[top.proponents.cpu()].reshape(-1).numpy(),
                "proponent_score": top.proponent_scores.double().cpu().reshape(-1).numpy(),
                "opponent_id": train_ids[top.opponents.cpu()].reshape(-1).numpy(),
                "opponent_score": top.opponent_scores.double().cpu().reshape(-1).numpy(),
            }
        )
        return require_finite_scores(frame, ["proponent_score", "opponent_score"], "test_example_id", "test")


def step_weights(checkpoints: Sequence[Checkpoint], kind: str) -> torch.Tensor | None:
    """Per-checkpoint weights eta_t: None for uniform, else each checkpoint's recorded learning rate."""
    if kind == "uniform":
        return None
    missing = [str(c.path) for c in checkpoints if c.learning_rate is None]
    if missing:
        raise InputError(f"eta='learning_rate' but checkpoints {missing} record no learning_rate")
    return torch.tensor([c.learning_rate for c in checkpoints], dtype=torch.float64)


def train_test_direction_features(
    checkpoints: Sequence[Checkpoint],
    parameters: Sequence[str],
    train_test: TrainTestArguments,
    forward: ForwardAccess,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = DIRECTION_BATCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the random-direction estimator (``direction_features``) for ``forward``'s train and test
    examples, at the checkpoints and with the step weights ``train_test`` picks. Each example's row depends
    on that example alone (and on which ``batch_size`` batch it shares), so shards of the examples that
    start on batch boundaries get exactly their rows of the whole: the pipeline's projection shards."""
    window = warmup_window(tuple(c.step for c in checkpoints), train_test.warmup_fraction)
    positions = direction_checkpoint_positions(window, train_test.direction_checkpoints)
    weights = step_weights(checkpoints, train_test.eta)
    return direction_features(
        forward, [checkpoints[p] for p in positions], parameters,
        None if weights is None else weights[torch.from_numpy(positions)],
        directions=train_test.directions, step_size=train_test.step_size, seed=train_test.seed,
        distribution=train_test.distribution, device=device, batch_size=batch_size,
    )


def require_finite_scores(frame: pd.DataFrame, columns: Sequence[str], id_column: str, split: str) -> pd.DataFrame:
    """Refuse scores that overflowed (a loss of 1e38 squares to inf in float32) instead of writing them."""
    for column in columns:
        finite = np.isfinite(frame[column].to_numpy())
        if not finite.all():
            first = frame[id_column].to_numpy()[np.argmin(finite)]
            raise InputError(
                f"{column}: {int((~finite).sum())} scores are NaN or inf (first at {id_column} {first}): the "
                f"{split} loss table's values are too large for the estimator's arithmetic"
            )
    return frame


def check_gram(gram: torch.Tensor, where: str) -> None:
    """A Gram matrix W W^T is finite, symmetric and has a non-negative diagonal (squared norms): anything
    else was edited or made by something else, and would give negative self-influence."""
    g = gram.double()
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise InputError(f"{where}: a Gram matrix is square, got shape {tuple(g.shape)}")
    if not torch.isfinite(g).all():
        raise InputError(f"{where}: holds NaN or inf values")
    diagonal = g.diagonal()
    if (diagonal < 0).any():
        t = int(torch.argmin(diagonal))
        raise InputError(f"{where}: diagonal entry {t} is {float(diagonal[t]):.6g}; squared norms are never negative")
    asymmetry = float((g - g.T).abs().max()) if g.numel() else 0.0
    scale = float(diagonal.max()) if g.numel() else 0.0
    if asymmetry > _SYMMETRY_TOLERANCE * scale:
        raise InputError(
            f"{where}: not symmetric (largest |G - G^T| is {asymmetry:.6g} against a largest diagonal of {scale:.6g})"
        )


def gram_to_frame(steps: Sequence[int], gram: torch.Tensor, provenance: GramProvenance | None = None) -> pd.DataFrame:
    """The Gram matrix as a table: a ``step`` column, then one ``step_<s>`` column per checkpoint.

    ``provenance`` travels in the frame's ``attrs`` (pandas keeps them in the parquet file's metadata),
    so a reused Gram file can be checked against the checkpoints it is used with."""
    frame = pd.DataFrame(gram.cpu().numpy(), columns=[step_column(s) for s in steps])
    frame.insert(0, "step", np.asarray(steps, dtype=np.int64))
    if provenance is not None:
        frame.attrs[_PROVENANCE_KEY] = provenance.to_json()
    return frame


def read_gram(path: str | os.PathLike) -> tuple[tuple[int, ...], torch.Tensor]:
    """Read and check a Gram parquet file written from ``gram_to_frame``: (steps, G)."""
    steps, gram, _ = read_gram_file(path)
    return steps, gram


def read_gram_file(path: str | os.PathLike) -> tuple[tuple[int, ...], torch.Tensor, GramProvenance | None]:
    """(steps, G, provenance record or None) of a Gram parquet file; G is checked (finite, symmetric,
    non-negative diagonal) and the record against the file's own steps."""
    try:
        frame = pd.read_parquet(path)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise InputError(f"gram file {path}: not a readable parquet file ({exc})") from None
    if "step" not in frame.columns:
        raise InputError(f"gram file {path}: has no 'step' column (columns: {list(frame.columns)})")
    steps = tuple(int(s) for s in frame["step"])
    columns = [step_column(s) for s in steps]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"gram file {path}: missing columns {missing}")
    gram = torch.from_numpy(frame[columns].to_numpy(dtype=np.float64, copy=True))
    check_gram(gram, f"gram file {path}")
    provenance = None
    if _PROVENANCE_KEY in frame.attrs:
        try:
            provenance = GramProvenance.from_json(frame.attrs[_PROVENANCE_KEY])
        except (TypeError, ValueError, KeyError) as exc:
            raise InputError(f"gram file {path}: malformed provenance record ({exc!r})") from None
        if provenance.steps != steps or len(provenance.fingerprints) != len(steps):
            raise InputError(f"gram file {path}: its provenance record disagrees with its step column")
    return steps, gram, provenance


def write_frame(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a DataFrame as parquet, atomically."""
    with atomic_output(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def _load_table(source: str | os.PathLike | LossTable, steps: tuple[int, ...]) -> LossTable:
    if isinstance(source, LossTable):
        if source.steps != steps:
            raise InputError(f"loss table steps {list(source.steps)} do not match checkpoint steps {list(steps)}")
        if len(source.example_ids) == 0:
            raise InputError("loss table: has no examples to score")
        return source
    return read_loss_table(source, expected_steps=steps)
