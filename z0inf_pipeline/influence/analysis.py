"""One run's influence analysis: the object the CLI and the Dagster assets both drive.

It owns the inputs (checkpoints, loss tables), validates that they belong together, computes
the Gram matrix once and returns tidy frames ready to be written as parquet.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch

from .atomic import atomic_output
from .checkpoints import Checkpoint, open_checkpoints, select_parameters
from .errors import InfluenceInputError
from .estimators import NeighborRule, self_influence, train_test_topk, warmup_window
from .gram import gram_matrix
from .loss_tables import LossTable, read_loss_table, step_column
from .signals import LOSS_KINDS, LossKind, loss_signals


@dataclass(frozen=True)
class InfluenceArguments:
    """How to estimate: neighbours per checkpoint, which parameters, which step weights."""

    neighbors: int = field(
        default=12,
        metadata={"help": "k neighbouring checkpoints per checkpoint (the window must hold at least k + 1)"},
    )
    neighbor_rule: NeighborRule = field(
        default="distance",
        metadata={"help": "neighbours nearest in parameter distance, or in training order", "choices": ("distance", "order")},
    )
    parameters: tuple[str, ...] | None = None
    eta: Literal["uniform", "learning_rate"] = "uniform"
    center: bool = True
    topk: int = 10
    warmup_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Z0 finite-difference and train-test influence leave out checkpoints before this fraction "
            "of training (by step): the initialisation and the first transient, where every example's loss "
            "falls at once; 0 keeps all"
        },
    )
    center_losses: bool = field(
        default=False,
        metadata={"help": "subtract each checkpoint's mean loss over examples before taking differences"},
    )
    weight_by_correlation: bool = field(
        default=False,
        metadata={
            "help": "train-test: multiply INF(i, z) by the Spearman correlation of the two loss trajectories"
        },
    )
    loss_kind: LossKind = field(
        default="cross_entropy",
        metadata={
            "help": "the loss in the tables; confidence and variability (exp(-loss)) need cross_entropy",
            "choices": LOSS_KINDS,
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise InfluenceInputError(f"warmup_fraction {self.warmup_fraction!r}: must be in [0, 1)")
        if self.loss_kind not in LOSS_KINDS:
            raise InfluenceInputError(f"loss_kind {self.loss_kind!r}: must be one of {list(LOSS_KINDS)}")

    def to_dict(self) -> dict:
        return asdict(self)


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
    ) -> None:
        """``gram``: a precomputed Gram matrix, or a Gram parquet file (its steps must match the checkpoints)."""
        self.args = args
        self.device = torch.device(device)
        self.checkpoints = open_checkpoints(checkpoints)
        if len(self.checkpoints) < 2:
            raise InfluenceInputError(f"Z0-Inf needs at least 2 checkpoints, got {len(self.checkpoints)}")
        self.parameter_names = select_parameters(self.checkpoints, args.parameters)
        self.steps = tuple(c.step for c in self.checkpoints)
        self.train = _load_table(train_losses, self.steps)
        self.test = None if test_losses is None else _load_table(test_losses, self.steps)
        if isinstance(gram, (str, os.PathLike)):
            gram_steps, matrix = read_gram(gram)
            if gram_steps != self.steps:
                raise InfluenceInputError(
                    f"gram file {gram}: steps {list(gram_steps)} do not match the checkpoints' {list(self.steps)}"
                )
            gram = matrix
        if gram is not None and tuple(gram.shape) != (len(self.steps),) * 2:
            raise InfluenceInputError(f"gram: shape {tuple(gram.shape)} does not match {len(self.steps)} checkpoints")
        self._given_gram = gram

    @cached_property
    def gram(self) -> torch.Tensor:
        if self._given_gram is not None:
            return self._given_gram.to(torch.float64)
        return gram_matrix(self.checkpoints, parameters=self.parameter_names, center=self.args.center, device=self.device)

    @cached_property
    def eta(self) -> torch.Tensor | None:
        if self.args.eta == "uniform":
            return None
        missing = [str(c.path) for c in self.checkpoints if c.learning_rate is None]
        if missing:
            raise InfluenceInputError(f"eta='learning_rate' but checkpoints {missing} record no learning_rate")
        return torch.tensor([c.learning_rate for c in self.checkpoints], dtype=torch.float64)

    @cached_property
    def window(self) -> np.ndarray:
        """Positions of the checkpoints the estimators use (``warmup_fraction``)."""
        return warmup_window(self.steps, self.args.warmup_fraction)

    def _windowed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The Gram matrix and step weights restricted to the window (a sub-block of G: the
        differences of the kept checkpoints do not depend on the others)."""
        keep = torch.from_numpy(self.window)
        eta = None if self.eta is None else self.eta[keep]
        return self.gram[keep][:, keep], eta

    def gram_frame(self) -> pd.DataFrame:
        return gram_to_frame(self.steps, self.gram)

    def self_influence_frame(self) -> pd.DataFrame:
        """Every signal of every training example, one column each (``signals.SIGNAL_COLUMNS``).

        The checkpoint window is an option of the Z0 finite-difference estimator only: the loss-table
        signals (variance, mean, final loss, confidence, variability) always use every checkpoint.
        """
        gram, eta = self._windowed()
        scores = self_influence(
            gram, self.train.values[torch.from_numpy(self.window)].to(self.device), self.args.neighbors, eta,
            neighbor_rule=self.args.neighbor_rule, center_losses=self.args.center_losses,
        )
        return pd.DataFrame(
            {
                "example_id": self.train.example_ids,
                "self_influence": scores.double().cpu().numpy(),
                **loss_signals(self.train.values, self.args.loss_kind),
            }
        )

    def topk_frame(self) -> pd.DataFrame:
        if self.test is None:
            raise InfluenceInputError("train-test influence needs a test loss table")
        k = min(self.args.topk, len(self.train.example_ids))
        keep = torch.from_numpy(self.window)
        gram, eta = self._windowed()
        top = train_test_topk(
            gram,
            self.train.values[keep].to(self.device),
            self.test.values[keep].to(self.device),
            k=k,
            neighbors=self.args.neighbors,
            eta=eta,
            neighbor_rule=self.args.neighbor_rule,
            center_losses=self.args.center_losses,
            weight_by_correlation=self.args.weight_by_correlation,
        )
        M = len(self.test.example_ids)
        train_ids = torch.from_numpy(self.train.example_ids)
        return pd.DataFrame(
            {
                "test_example_id": np.repeat(self.test.example_ids, k),
                "rank": np.tile(np.arange(1, k + 1), M),
                "proponent_id": train_ids[top.proponents.cpu()].reshape(-1).numpy(),
                "proponent_score": top.proponent_scores.double().cpu().reshape(-1).numpy(),
                "opponent_id": train_ids[top.opponents.cpu()].reshape(-1).numpy(),
                "opponent_score": top.opponent_scores.double().cpu().reshape(-1).numpy(),
            }
        )


def gram_to_frame(steps: Sequence[int], gram: torch.Tensor) -> pd.DataFrame:
    """The Gram matrix as a table: a ``step`` column, then one ``step_<s>`` column per checkpoint."""
    frame = pd.DataFrame(gram.cpu().numpy(), columns=[step_column(s) for s in steps])
    frame.insert(0, "step", np.asarray(steps, dtype=np.int64))
    return frame


def read_gram(path: str | os.PathLike) -> tuple[tuple[int, ...], torch.Tensor]:
    """Read a Gram parquet file written from ``gram_to_frame``: (steps, G)."""
    try:
        frame = pd.read_parquet(path)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise InfluenceInputError(f"gram file {path}: not a readable parquet file ({exc})") from None
    if "step" not in frame.columns:
        raise InfluenceInputError(f"gram file {path}: has no 'step' column (columns: {list(frame.columns)})")
    steps = tuple(int(s) for s in frame["step"])
    columns = [step_column(s) for s in steps]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InfluenceInputError(f"gram file {path}: missing columns {missing}")
    return steps, torch.from_numpy(frame[columns].to_numpy(dtype=np.float64))


def write_frame(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a DataFrame as parquet, atomically."""
    with atomic_output(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def _load_table(source: str | os.PathLike | LossTable, steps: tuple[int, ...]) -> LossTable:
    if isinstance(source, LossTable):
        if source.steps != steps:
            raise InfluenceInputError(f"loss table steps {list(source.steps)} do not match checkpoint steps {list(steps)}")
        return source
    return read_loss_table(source, expected_steps=steps)
