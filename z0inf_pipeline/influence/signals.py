"""Every zeroth-order signal of a training example, side by side, from one loss table.

Z0-Inf's finite-difference self-influence needs the Gram matrix; everything else here needs only
the losses l_i(t) at the checkpoints: the reference code's other two self-influence estimators
(variance and mean over checkpoints), the final loss, and the data-map pair (Swayamdipta et al.,
2020): confidence, the mean over checkpoints of the probability of the given label, and its
variability (standard deviation). All are computed at once over the (T, N) table, no loop over
examples.
"""

from __future__ import annotations

from dataclasses import dataclass
import typing
from typing import Literal

import numpy as np
import pandas as pd
import torch

from ..errors import InputError

LossKind = Literal["cross_entropy", "other"]
LOSS_KINDS: tuple[str, ...] = typing.get_args(LossKind)


@dataclass(frozen=True)
class Signal:
    """A per-example score column and which end of it is suspicious."""

    column: str
    higher_is_suspicious: bool
    meaning: str


SIGNALS: tuple[Signal, ...] = (
    Signal("self_influence", True, "Z0 finite-difference self-influence: how far the model moved just for it"),
    Signal("variance_self_influence", True, "variance of its loss over checkpoints"),
    Signal("mean_loss", True, "mean of its loss over checkpoints"),
    Signal("final_loss", True, "its loss at the last checkpoint"),
    Signal("confidence", False, "mean probability of its given label over checkpoints (low: suspicious)"),
    Signal("variability", True, "standard deviation of that probability over checkpoints (data maps)"),
)
SIGNAL_COLUMNS: tuple[str, ...] = tuple(s.column for s in SIGNALS)
# Why confidence and variability are NaN for any loss but cross-entropy.
NO_CONFIDENCE_REASON = (
    "confidence and variability need a cross-entropy loss: only then is exp(-loss) the probability of the "
    "given label; for a 0-1 or signed loss they are left NaN"
)


def signal(column: str) -> Signal:
    for candidate in SIGNALS:
        if candidate.column == column:
            return candidate
    raise InputError(f"signal {column!r}: must be one of {list(SIGNAL_COLUMNS)}")


def loss_signals(losses: torch.Tensor, loss_kind: LossKind = "cross_entropy") -> dict[str, np.ndarray]:
    """Variance, mean, final loss, confidence and variability of each column of a (T, N) loss table."""
    if loss_kind not in LOSS_KINDS:
        raise InputError(f"loss_kind {loss_kind!r}: must be one of {list(LOSS_KINDS)}")
    if losses.ndim != 2 or losses.shape[0] < 2:
        raise InputError(f"losses: expected a (T >= 2, N) table, got shape {tuple(losses.shape)}")
    values = losses.to(torch.float64)
    out = {
        "variance_self_influence": values.var(dim=0, correction=0),
        "mean_loss": values.mean(dim=0),
        "final_loss": values[-1],
    }
    if loss_kind == "cross_entropy":
        probability = torch.exp(-values)
        out["confidence"] = probability.mean(dim=0)
        out["variability"] = probability.std(dim=0, correction=0)
    else:
        nan = torch.full_like(values[0], float("nan"))
        out["confidence"], out["variability"] = nan, nan.clone()
    return {name: column.cpu().numpy() for name, column in out.items()}


def suspicion(scores: pd.DataFrame, column: str) -> np.ndarray:
    """The signal oriented so that higher is more suspicious (confidence is negated)."""
    values = scores[column].to_numpy(np.float64)
    return values if signal(column).higher_is_suspicious else -values


def suspicion_ranks(scores: pd.DataFrame, columns=SIGNAL_COLUMNS) -> pd.DataFrame:
    """Rank of every example under every signal: 1 = most suspicious (ties share the lower rank);
    <NA> where the signal is undefined (NaN)."""
    ranks = {
        f"{column}_rank": pd.Series(suspicion(scores, column)).rank(ascending=False, method="min").astype("Int64")
        for column in columns
        if column in scores
    }
    return pd.DataFrame(ranks, index=scores.index)


def parse_flag_score(spec: str) -> tuple[str, ...]:
    """``"mean_loss"`` or ``"mean_loss+confidence"`` (a rank average) -> the signal columns it names."""
    columns = tuple(part.strip() for part in str(spec).split("+"))
    for column in columns:
        signal(column)
    if len(set(columns)) != len(columns):
        raise InputError(f"flag score {spec!r}: names a signal twice")
    return columns


def flag_score(scores: pd.DataFrame, spec: str) -> np.ndarray:
    """The score a flag policy cuts: one signal oriented so that higher is more suspicious, or for
    ``a+b+...`` the mean of the signals' suspicion ranks as fractions in (0, 1] (1 = most suspicious).

    A single signal keeps its own scale, so a cut-off on it means the same thing from run to run; a rank
    average is relative to the run by construction (its spread is the same however clean the data).
    """
    columns = parse_flag_score(spec)
    missing = [c for c in columns if c not in scores]
    if missing:
        raise InputError(f"flag score {spec!r}: the scores have no column(s) {missing}")
    undefined = [c for c in columns if scores[c].isna().any()]
    if undefined:
        raise InputError(f"flag score {spec!r}: {undefined} undefined (NaN) here; {NO_CONFIDENCE_REASON}")
    if len(columns) == 1:
        return suspicion(scores, columns[0])
    n = len(scores)
    fractions = [pd.Series(suspicion(scores, c)).rank(method="average").to_numpy() / n for c in columns]
    return np.mean(fractions, axis=0)
