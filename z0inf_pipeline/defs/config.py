"""Run configuration shown (and editable) in the Dagster launchpad.

Each class is a settings model of the core together with ``dg.Config``: Dagster config is pydantic, so
the launchpad shows the model's own fields, help (``description``), defaults and choices, and a bad value
is refused by the model's own validation, naming the field. Nothing here redeclares a setting; a class
adds only what the launchpad needs besides (the MLflow experiment, who changed a policy).
"""

from __future__ import annotations

from typing import Literal, Optional, TypeVar

import dagster as dg
from pydantic import Field

from ..arguments import Settings
from ..evaluation.promotion import PromotionPolicy
from ..influence.analysis import (
    GramArguments,
    LossArguments,
    TopKArguments,
    TrainTestArguments,
    WindowArguments,
)
from ..review.policy import FlagPolicy
from ..training import TrainRecipe

S = TypeVar("S", bound=Settings)


class SettingsConfig(dg.Config):
    """Launchpad config made of core settings models."""

    def settings(self, cls: type[S]) -> S:
        """The settings of ``cls`` this config holds (the fields it does not show keep their defaults)."""
        return cls(**{name: getattr(self, name) for name in cls.model_fields if name in type(self).model_fields})


class TrainingConfig(TrainRecipe, SettingsConfig):
    """A training recipe (``z0inf_pipeline.training.TrainRecipe``) and the MLflow experiment to log it
    to. The defaults are the library's: digits, an MLP, no label noise (the demo adds 10%)."""

    experiment: str = Field(default="z0inf", description="MLflow experiment of the new run")


class GramConfig(GramArguments, SettingsConfig):
    """Which weights enter the Gram matrix G = W W^T."""


class TrainTestConfig(TrainTestArguments, SettingsConfig):
    """Which train-test method runs (random directions by default) and its settings, chosen on the suite's LDS."""


class TopKConfig(TopKArguments, LossArguments, SettingsConfig):
    """How train-test influence is estimated, and how many proponents and opponents are kept."""

    train_test: TrainTestConfig = Field(default_factory=TrainTestConfig,
                                        description="the train-test method and its settings")
    shard_size: Optional[int] = Field(
        default=None,
        gt=0,
        description="directions: training and test examples per shard of the forward passes (rounded up to whole "
        "compute batches and top-k tiles); each shard is one step, so executors that run steps in parallel "
        "(celery, k8s) spread the work. Unset: as many as keep a shard's projections (P x C float64 per "
        "example) to 256 MiB, 65,536 examples at P = 256, C = 2",
    )


class EstimatorConfig(LossArguments, WindowArguments, SettingsConfig):
    """How the per-example signals (self-influence and the loss-table signals) are estimated."""


class FlagPolicyConfig(FlagPolicy, SettingsConfig):
    """Which examples are flagged for review, and how many may stay unreviewed before retraining is blocked.
    Fixed when a run's queue is first built: another policy later needs ``policy_changed_by`` and is
    refused in any job but ``influence_job``."""

    policy_changed_by: Optional[str] = Field(
        default=None,
        description="reviewer who rebuilds this run's queue with another flag policy (recorded; only in influence_job)",
    )


class PromotionConfig(PromotionPolicy, SettingsConfig):
    """When the retrained model becomes the registered model's champion: the margin and the bootstrap."""


class LossTableConfig(dg.Config):
    """Where the loss tables come from: the run's logged tables, or the checkpoints re-evaluated on the
    compute device (needs the run's training config to rebuild its data)."""

    source: Literal["auto", "logged", "recompute"] = Field(
        default="auto", description="auto: recompute when the run's data can be rebuilt, else use the logged tables"
    )
    loss: Literal["cross_entropy", "zero_one"] = Field(
        default="cross_entropy", description="loss to recompute with (zero_one: Z0-Inf on a non-differentiable loss)"
    )
    shard_size: int = Field(
        default=262_144,
        gt=0,
        description="examples per shard when recomputing (rounded up to whole compute batches); each shard is "
        "one step, so executors that run steps in parallel (celery, k8s) spread the work",
    )


class RetrainConfig(dg.Config):
    experiment: str = Field(default="z0inf", description="MLflow experiment of the retrained run")
