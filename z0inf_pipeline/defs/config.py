"""Run configuration shown (and editable) in the Dagster launchpad."""

from typing import Literal, Optional

import dagster as dg
from pydantic import Field

from ..training import DEMO_CONFIG as _DEFAULT
from ..training import TrainConfig


class TrainingConfig(dg.Config):
    """A training recipe (``z0inf_pipeline.training.TrainConfig``); the defaults are the demo's:
    digits, an MLP, 10% of the training labels flipped uniformly."""

    dataset: str = Field(default=_DEFAULT.dataset, description="digits, breast_cancer, or a .csv/.parquet path")
    model: Literal["logreg", "mlp", "cnn"] = _DEFAULT.model
    hidden: list[int] = Field(default=list(_DEFAULT.hidden), description="hidden layer widths")
    epochs: int = Field(default=_DEFAULT.epochs, ge=1)
    checkpoints: int = Field(default=_DEFAULT.checkpoints, ge=2, description="checkpoints T kept for Z0-Inf")
    optimizer: Literal["sgd", "adamw"] = _DEFAULT.optimizer
    lr: float = Field(default=_DEFAULT.lr, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = _DEFAULT.schedule
    momentum: float = _DEFAULT.momentum
    weight_decay: float = _DEFAULT.weight_decay
    batch_size: int = Field(default=_DEFAULT.batch_size, ge=1)
    seed: int = _DEFAULT.seed
    test_fraction: float = _DEFAULT.test_fraction
    label_noise: float = Field(
        default=_DEFAULT.label_noise, ge=0.0, lt=1.0, description="share of training labels flipped on purpose"
    )
    noise_kind: Literal["uniform", "confusable"] = _DEFAULT.noise_kind
    noise_seed: int = _DEFAULT.noise_seed
    label_column: str = Field(default=_DEFAULT.label_column, description="label column of a .csv/.parquet dataset")
    experiment: str = Field(default="z0inf", description="MLflow experiment of the new run")

    def to_train_config(self) -> TrainConfig:
        fields = self.model_dump()
        fields.pop("experiment")
        return TrainConfig.from_dict(fields)


class LossTableConfig(dg.Config):
    """Where the loss tables come from: the run's logged tables, or the checkpoints re-evaluated on the
    compute device (needs the run's training config to rebuild its data)."""

    source: Literal["auto", "logged", "recompute"] = Field(
        default="auto", description="auto: recompute when the run's data can be rebuilt, else use the logged tables"
    )
    loss: Literal["cross_entropy", "zero_one"] = Field(
        default="cross_entropy", description="loss to recompute with (zero_one: Z0-Inf on a non-differentiable loss)"
    )


class GramConfig(dg.Config):
    parameters: Optional[list[str]] = Field(default=None, description="only tensors matching these globs (e.g. '2.*')")
    center: bool = Field(default=True, description="centre the weights over checkpoints before W W^T")


class EstimatorConfig(dg.Config):
    neighbors: int = Field(default=2, ge=1, description="neighbouring checkpoints per checkpoint")
    neighbor_rule: Literal["order", "distance"] = "order"
    eta: Literal["uniform", "learning_rate"] = Field(default="uniform", description="per-checkpoint weights")


class TopKConfig(EstimatorConfig):
    topk: int = Field(default=10, ge=1, description="proponents and opponents kept per test example")


class FlagPolicyConfig(dg.Config):
    """Which examples are flagged for review, and how many may stay unreviewed before retraining is blocked."""

    method: Literal["quantile", "zscore"] = Field(default="quantile", description="top quantile, or robust z-score")
    quantile: float = Field(default=0.9, gt=0.0, lt=1.0, description="flag scores above this quantile")
    z_threshold: float = Field(default=3.5, gt=0.0, description="flag robust z-scores (median / MAD) above this")
    max_unreviewed_fraction: float = Field(
        default=0.0, ge=0.0, le=1.0, description="share of the training set that may be flagged but undecided"
    )

    def to_policy(self):
        from ..review import FlagPolicy

        return FlagPolicy(**self.model_dump())


class RetrainConfig(dg.Config):
    experiment: str = Field(default="z0inf", description="MLflow experiment of the retrained run")
