"""Which training examples get flagged for review: a flag score, a cut-off on it, and a review budget.

The flag score is one signal of ``influence.signals`` (or a rank average of several) oriented so that
higher is more suspicious. The default count is ``held_out``: how many training examples have a loss
above what the held-out (test) examples' losses predict, flagged highest flag score first. A clean
training example is fit at least as well as a held-out one of the same difficulty, so hard-but-right
examples are matched by hard held-out ones and only wrong labels stand out: at every trained checkpoint,
over loss thresholds where the given label is less likely than not (p_y <= 1/2), the largest gap between
the training and held-out shares above the threshold, times N, is a lower bound on the wrong labels (near
zero on clean data; a weak model raises both shares alike). When that gap is beyond sampling noise (the
two-sample DKW band at 5%), the count extends to the fewer of confident learning's count (Northcutt et
al., 2021; per-class thresholds on exp(-mean loss)) and the training examples above that threshold. Runs
without a held-out table or labels fall back to ``confident``: the fewer of confident learning's count and
the high component of a two-Gaussian mixture on the score (scikit-learn). Chosen on the benchmark suite
(``benchmarks/accuracy.py --counts``). A run retrained from a reviewed run keeps that run's cut-off
(same recipe, same loss scale), so the flagged count falls as the data gets cleaner. The quantile and
robust z-score cut-offs stay as options; every method respects the review budget ``max_flagged``. The
cut-off becomes the flagging expectation of the GX suite ``flagging`` (``z0inf_pipeline.quality``), whose
unexpected rows are the review queue.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from ..errors import InputError
from ..influence.loss_tables import step_column, steps_of
from ..influence.signals import SIGNAL_COLUMNS, flag_score, parse_flag_score
from ..arguments import Settings
from ..training.layout import NO_LABEL

# 1.4826 * MAD estimates the standard deviation of normally distributed data.
MAD_TO_SIGMA = 1.4826
METHODS = ("held_out", "confident", "mixture", "quantile", "zscore")
# Methods whose cut-off a retrained run may inherit from its reviewed ancestor.
INHERITING_METHODS = ("held_out", "confident", "mixture")
# A cross-entropy loss above ln 2 means p_y < 1/2: the given label is less likely than not. Only there
# can a training loss above the held-out ones mark a wrong label (below it, fitting makes train < test).
WRONG_LABEL_LOSS = float(np.log(2))
# Significance of the held-out excess: beyond the two-sample DKW band at this level it is not chance.
EXCESS_ALPHA = 0.05


class FlagPolicy(Settings):
    """How examples are flagged for review, and how many may stay unreviewed before retraining."""

    owner: ClassVar[str] = "flag policy"

    score: str = Field(
        "mean_loss",
        description="the flag score: one signal, or several joined by '+' (the mean of their suspicion ranks); "
        f"chosen on the benchmark suite's mean AUPRC (signals: {', '.join(SIGNAL_COLUMNS)})",
    )
    method: Literal[METHODS] = Field(
        "held_out",
        description="held_out: flag as many as the training examples whose loss runs above what the held-out "
        "(test) losses predict, at the checkpoint and loss threshold where the gap is largest; when that gap "
        "is beyond sampling noise, up to the fewer of confident learning's count and the training examples "
        "above that threshold (needs labels, a cross-entropy loss and a held-out loss table, else as "
        "confident); confident: flag as many as the smaller of confident learning's count of confidently "
        "mislabelled examples (per-class thresholds on exp(-mean_loss); needs labels and a cross-entropy "
        "loss, else the mixture alone) and the mixture's high group; mixture: flag the high component of a "
        "two-Gaussian mixture on the score (none if the score has no separate high group); quantile: flag "
        "above the quantile; zscore: robust z above z_threshold",
    )
    quantile: float = Field(0.9, description="method=quantile: flag scores above this quantile")
    z_threshold: float = Field(
        3.5, description="method=zscore: flag robust z = (score - median) / (1.4826 MAD) above this"
    )
    posterior: float = Field(
        0.5,
        description="methods confident and mixture (and held_out without a held-out table): the mixture flags "
        "where the posterior of its high component exceeds this",
    )
    inherit_cutoff: bool = Field(
        True,
        description="methods held_out, confident and mixture: a retrained run keeps the cut-off found on its "
        "nearest reviewed ancestor (same policy), so a cleaner run flags fewer examples instead of a fresh "
        "mixture's share",
    )
    max_flagged: int = Field(
        1000, description="review budget: flag at most this many examples, highest scores first (0: no cap)"
    )
    max_unreviewed_fraction: float = Field(
        0.0,
        description="share of the training set that may be flagged yet have no decision before the review gate "
        "blocks retraining (0: every flagged example needs a decision)",
    )

    @model_validator(mode="after")
    def _check(self) -> "FlagPolicy":
        parse_flag_score(self.score)
        if not 0.0 < self.quantile < 1.0:
            raise InputError(f"flag policy: quantile {self.quantile} must be strictly between 0 and 1")
        if not np.isfinite(self.z_threshold) or self.z_threshold <= 0:
            raise InputError(f"flag policy: z_threshold {self.z_threshold} must be a positive number")
        if not 0.0 < self.posterior < 1.0:
            raise InputError(f"flag policy: posterior {self.posterior} must be strictly between 0 and 1")
        if self.max_flagged < 0:
            raise InputError(f"flag policy: max_flagged {self.max_flagged!r} must be an integer >= 0")
        if not 0.0 <= self.max_unreviewed_fraction <= 1.0:
            raise InputError(
                f"flag policy: max_unreviewed_fraction {self.max_unreviewed_fraction} must be in [0, 1]"
            )
        return self

    @classmethod
    def from_dict(cls, values: dict) -> "FlagPolicy":
        """The policy a review queue recorded (``to_dict``); a setting the queue predates keeps its default,
        except the score, which was self-influence before it could be chosen."""
        known = set(cls.model_fields)
        return cls(**{"score": "self_influence", **{k: v for k, v in values.items() if k in known}})

    def describe(self) -> str:
        if self.method == "held_out":
            rule = (f"{self.score}, as many highest as the training losses run above the held-out ones (extended "
                    "to confident learning's count when that excess is significant)")
        elif self.method == "confident":
            rule = (f"{self.score}, as many highest as the fewer of confident learning's label-error count and "
                    f"a two-Gaussian mixture's high group (posterior > {self.posterior:g})")
        elif self.method == "mixture":
            rule = f"{self.score} in the high component of a two-Gaussian mixture (posterior > {self.posterior:g})"
        elif self.method == "quantile":
            rule = f"{self.score} above its {self.quantile:.3g} quantile (top {100 * (1 - self.quantile):.3g}%)"
        else:
            rule = f"robust z-score of {self.score} above {self.z_threshold:g} (median / MAD)"
        return rule + (f", at most {self.max_flagged} highest" if self.max_flagged else "")


@dataclass(frozen=True)
class Flags:
    """The outcome of a policy: the flag score, the cut-off on it, who is flagged, and robust z-scores."""

    cutoff: float
    flagged: np.ndarray
    robust_z: np.ndarray
    score: np.ndarray
    # Per example, the signals that flag it on their own under the same policy, joined by ", "
    # ("" for none); None when only a score vector was given.
    flagged_by: np.ndarray | None = None
    # How the count was found, in words (the held-out excess and its extension), "" for other methods.
    counted_by: str = ""

    @property
    def count(self) -> int:
        return int(self.flagged.sum())

    @property
    def fraction(self) -> float:
        return float(self.flagged.mean()) if len(self.flagged) else 0.0


def robust_z(scores: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(z, median, scale) with scale = 1.4826 * MAD. With MAD = 0 every score above the median is
    infinitely far out (z = +inf), every score at it z = 0."""
    scores = np.asarray(scores, dtype=np.float64)
    median = float(np.median(scores))
    scale = MAD_TO_SIGMA * float(np.median(np.abs(scores - median)))
    diff = scores - median
    if scale > 0:
        return diff / scale, median, scale
    with np.errstate(invalid="ignore"):
        return np.where(diff == 0, 0.0, np.sign(diff) * np.inf), median, scale


@dataclass(frozen=True)
class Mixture:
    """A two-component 1-D Gaussian mixture: (low, high) weights, means and standard deviations."""

    weights: np.ndarray
    means: np.ndarray
    stds: np.ndarray

    def high_posterior(self, x: np.ndarray) -> np.ndarray:
        log_density = (
            np.log(self.weights)[None, :]
            - np.log(self.stds)[None, :]
            - 0.5 * ((x[:, None] - self.means[None, :]) / self.stds[None, :]) ** 2
        )
        log_density -= log_density.max(axis=1, keepdims=True)
        density = np.exp(log_density)
        return density[:, 1] / density.sum(axis=1)


def fit_mixture(x: np.ndarray) -> Mixture:
    """Two-Gaussian EM (scikit-learn) on a 1-D sample.

    Started from the lower half and the top tenth so that a small high group is found; a floor on
    the variances (1e-6 of the sample's) keeps a component from collapsing onto tied values.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    x = np.asarray(x, dtype=np.float64)
    spread = float(x.var())
    if len(x) < 2 or spread == 0:
        return Mixture(np.array([1.0, 1e-12]), np.array([x.mean(), x.mean()]), np.ones(2))
    floor = 1e-6 * spread
    groups = [x[x <= np.quantile(x, 0.5)], x[x >= np.quantile(x, 0.9)]]
    fitted = GaussianMixture(  # "diag" in 1-D is the full model, at half the cost per EM iteration
        2, covariance_type="diag", tol=1e-10, max_iter=200, reg_covar=floor, weights_init=[0.9, 0.1],
        means_init=[[g.mean()] for g in groups], precisions_init=[[1 / max(g.var(), floor)] for g in groups],
    )
    with warnings.catch_warnings():  # a tie-heavy sample may stop at max_iter: the fit is still usable
        warnings.simplefilter("ignore", ConvergenceWarning)
        fitted.fit(x[:, None])
    order = np.argsort(fitted.means_[:, 0])
    return Mixture(fitted.weights_[order], fitted.means_[order, 0], np.sqrt(fitted.covariances_[order, 0]))


def confident_error_count(mean_loss: np.ndarray, labels: np.ndarray) -> int:
    """Confident learning's count of label errors from the probability of the given label alone.

    p_i = exp(-mean_loss_i) (the geometric mean over checkpoints of the probability of the given
    label, a cross-entropy loss), t_c = the mean of p over the examples labelled c. Confident learning
    counts an example labelled y as an error when some other class j holds at least t_j of its
    probability; with only p_y known, the most another class can hold is 1 - p_y, so an example counts
    when p_y <= 1 - min_{j != y} t_j. Vectorised over examples (one pass per class via bincount).
    """
    probability = np.exp(-np.asarray(mean_loss, dtype=np.float64))
    classes, index = np.unique(np.asarray(labels), return_inverse=True)
    if len(classes) < 2:
        return 0
    thresholds = np.bincount(index, weights=probability) / np.bincount(index)
    lowest, second = np.sort(thresholds)[:2]
    other_lowest = np.where(thresholds == lowest, second, lowest)  # min over the other classes
    return int((probability <= 1.0 - other_lowest[index]).sum())


@dataclass(frozen=True)
class HeldOutExcess:
    """Where the training losses run highest above the held-out ones: at checkpoint ``step``, ``above``
    training examples have a loss above ``threshold``, ``excess`` more than the held-out share above it
    predicts for a training set of this size; ``significant`` when the gap is beyond sampling noise."""

    excess: int
    above: int
    step: int
    threshold: float
    significant: bool

    def describe(self, confident_errors: int | None) -> str:
        counted = (f"{self.excess} training losses above what the held-out losses predict (at step {self.step}, "
                   f"loss > {self.threshold:.3g}, {self.above} above it)")
        if not self.significant or confident_errors is None:
            return counted + ("; within sampling noise" if not self.significant else "")
        return (counted + f"; significant, so up to the fewer of confident learning's {confident_errors} and those "
                f"{self.above}: {self.count(confident_errors)}")

    def count(self, confident_errors: int | None) -> int:
        """How many to flag: the excess (a lower bound: clean training examples are fit better than held-out
        ones, and a memorised wrong label drops below the threshold); when it is significant, up to the fewer
        of confident learning's count and the examples above the threshold."""
        if not self.significant or confident_errors is None:
            return self.excess
        return max(self.excess, min(confident_errors, self.above))


def held_out_excess(train_losses: pd.DataFrame, held_out_losses: pd.DataFrame,
                    alpha: float = EXCESS_ALPHA) -> HeldOutExcess | None:
    """The largest gap, over trained checkpoints (step > 0: a model that has not trained on these labels
    says nothing about them) and cross-entropy thresholds x >= ln 2, between the share of training losses
    above x and the share of held-out losses above x (loss tables: ``example_id`` and ``step_<s>`` columns;
    the checkpoints both have). None without a shared trained checkpoint or held-out rows. Significant when
    the gap exceeds the two-sample Dvoretzky-Kiefer-Wolfowitz band sqrt(ln(2 / alpha) / 2 (1/N + 1/M)).
    One sort per checkpoint, vectorised over examples."""
    shared = [step for step in steps_of(train_losses.columns) if step > 0 and step_column(step) in held_out_losses]
    n, m = len(train_losses), len(held_out_losses)
    if not shared or n == 0 or m == 0:
        return None
    best = None
    for step in shared:
        train = np.sort(train_losses[step_column(step)].to_numpy(np.float64))
        held_out = np.sort(held_out_losses[step_column(step)].to_numpy(np.float64))
        thresholds = train[train >= WRONG_LABEL_LOSS]
        if len(thresholds) == 0:
            continue
        train_above = n - np.searchsorted(train, thresholds, side="right")
        gap = train_above / n - (m - np.searchsorted(held_out, thresholds, side="right")) / m
        at = int(gap.argmax())
        if best is None or gap[at] > best[0]:
            best = (float(gap[at]), int(train_above[at]), step, float(thresholds[at]))
    if best is None:  # no training loss reaches ln 2 at any checkpoint: no label is less likely than not
        return HeldOutExcess(0, 0, shared[-1], WRONG_LABEL_LOSS, False)
    gap, above, step, threshold = best
    band = float(np.sqrt(np.log(2 / alpha) / 2 * (1 / n + 1 / m)))
    return HeldOutExcess(max(0, round(gap * n)), above, step, threshold, gap > band)


def flag_scores(scores, policy: FlagPolicy, *, labels=None, loss_tables=None,
                inherited_cutoff: float | None = None) -> Flags:
    """Flag examples by ``policy``: ``scores`` is the scores frame (its ``policy.score`` signal is used,
    and every defined signal is also flagged on its own for ``Flags.flagged_by``: under the counting methods
    ``held_out`` and ``confident``, its highest as many as were flagged) or a vector that already is the
    flag score (higher = more suspicious).

    ``labels`` (methods ``held_out`` and ``confident``): the given label of each row of ``scores``; with the
    frame's ``mean_loss`` (cross-entropy) they give confident learning's count. ``loss_tables`` (method
    ``held_out``): the run's (train, held-out) loss-table frames, ``example_id`` and ``step_<s>`` columns.
    Without labels the count is the mixture's; without a held-out table, as ``confident``.
    ``inherited_cutoff`` (the counting methods and ``mixture``): flag scores at or above it instead of
    counting on this run (see ``inherited_cutoff`` in ``review.lineage``).
    """
    if not isinstance(scores, pd.DataFrame):
        return _flag_values(scores, policy, inherited_cutoff)
    counting = policy.method in ("held_out", "confident")
    errors = _confident_count(scores, labels) if counting else None
    count, counted_by = None, ""
    # An inherited cut-off decides the flags on its own: the held-out excess is counted only without one.
    if policy.method == "held_out" and errors is not None and loss_tables is not None and inherited_cutoff is None:
        excess = held_out_excess(*loss_tables)
        if excess is not None:
            count, counted_by = excess.count(errors), excess.describe(errors)
    flags = replace(_flag_values(flag_score(scores, policy.score), policy, inherited_cutoff, errors, count),
                    counted_by=counted_by)
    defined = [c for c in SIGNAL_COLUMNS if c in scores and scores[c].notna().all()]
    joined = pd.Series("", index=range(len(scores)), dtype=object)
    for column in defined:
        if counting:  # the count is how many labels look wrong: each signal's top that many
            values = flag_score(scores, column)
            alone = _highest(values, flags.count) & (values > values.min())  # a constant signal singles out none
        else:
            alone = _flag_values(flag_score(scores, column), policy.replace(score=column)).flagged
        joined = joined + np.where(alone, column + ", ", "")
    flagged_by = joined.str.removesuffix(", ").to_numpy(dtype=object)
    return replace(flags, flagged_by=flagged_by)


def given_labels(examples: pd.DataFrame, scores: pd.DataFrame) -> np.ndarray | None:
    """The label of each row of ``scores`` from a run's examples table (None when it has no labels, or its
    examples have no class: a text answer's label is NO_LABEL, and its loss is no class probability)."""
    if "label" not in examples or (examples["label"] == NO_LABEL).any():
        return None
    train = examples[examples["split"] == "train"] if "split" in examples else examples
    labels = train.set_index("example_id")["label"].reindex(scores["example_id"].to_numpy())
    if labels.isna().any():
        raise InputError(f"flag policy: {int(labels.isna().sum())} scored example(s) have no label")
    return labels.to_numpy()


def _confident_count(scores: pd.DataFrame, labels) -> int | None:
    """Confident learning's count for a scores frame, None where it is undefined (no labels, or a loss
    that is not cross-entropy: its ``confidence`` column is NaN)."""
    if labels is None or "mean_loss" not in scores or scores.get("confidence", pd.Series([np.nan])).isna().any():
        return None
    labels = np.asarray(labels)
    if len(labels) != len(scores):
        raise InputError(f"flag policy: {len(labels)} labels for {len(scores)} scores")
    return confident_error_count(scores["mean_loss"].to_numpy(np.float64), labels)


def _flag_values(values, policy: FlagPolicy, inherited_cutoff: float | None = None,
                 confident_errors: int | None = None, count: int | None = None) -> Flags:
    """``count``: how many to flag, highest first, found upstream (``held_out``); None: count here."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise InputError(f"flag policy: expected a non-empty vector of scores, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise InputError(f"flag policy: {int((~np.isfinite(values)).sum())} score(s) are NaN or inf")
    z, median, scale = robust_z(values)
    if policy.method == "quantile":
        cutoff = float(np.quantile(values, policy.quantile))
        flagged = values > cutoff
    elif policy.method == "zscore":
        cutoff = median + policy.z_threshold * scale
        flagged = z > policy.z_threshold
    elif inherited_cutoff is not None:
        cutoff = float(inherited_cutoff)
        flagged = values >= cutoff
    elif count is not None:
        flagged = _highest(values, count)
        cutoff = float(values[flagged].min()) if flagged.any() else float("inf")
    else:
        mixture = fit_mixture(values)
        # Above the low component's mean only: a wide high component also wins far in the low tail.
        flagged = (mixture.high_posterior(values) > policy.posterior) & (values > mixture.means[0])
        if confident_errors is not None and confident_errors < flagged.sum():
            flagged = _highest(values, confident_errors)
        cutoff = float(values[flagged].min()) if flagged.any() else float("inf")
    if policy.max_flagged and flagged.sum() > policy.max_flagged:
        flagged &= _highest(values, policy.max_flagged)
        cutoff = float(values[flagged].min())
    return Flags(cutoff, flagged, z, values)


def _highest(values: np.ndarray, count: int) -> np.ndarray:
    """Mask of the ``count`` highest values (ties broken by position)."""
    kept = np.zeros(len(values), dtype=bool)
    kept[np.argsort(-values, kind="stable")[:count]] = True
    return kept
