"""Run configuration shown (and editable) in the Dagster launchpad.

The recipe, estimator and flag-policy classes are generated from the pure dataclasses that define
those settings once (``TrainConfig``, ``InfluenceArguments``, ``FlagPolicy``): same names, help
text and defaults, and a bad value is refused by the dataclass's own validation, naming the field.
"""

from __future__ import annotations

import typing
from typing import Any, Iterable, Literal, Optional

import dagster as dg
from pydantic import Field, model_validator

from ..evaluation.promotion import PromotionPolicy
from ..influence.analysis import GRAM_SETTINGS, TRAIN_TEST_OWN, InfluenceArguments, TrainTestArguments
from ..review.policy import FlagPolicy
from ..settings_schema import Setting, setting_fields
from ..training import TrainConfig


def config_class(
    arguments: type,
    name: str,
    doc: str,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> type[dg.Config]:
    """A ``dg.Config`` with one field per setting of the dataclass ``arguments`` (description = its
    help, default = its default) and ``to_arguments()`` back to the dataclass. Construction runs the
    dataclass's validation, so a bad launchpad value fails the step with the field named."""
    settings = setting_fields(arguments, include=include, exclude=exclude)
    namespace: dict[str, Any] = {
        "__doc__": doc,
        "__module__": __name__,
        "__qualname__": name,
        "__annotations__": {s.name: _config_annotation(s) for s in settings},
    }
    for s in settings:
        default = list(s.default) if isinstance(s.default, tuple) else s.default
        namespace[s.name] = Field(default=default, description=s.help or None)

    def to_arguments(self):
        """The settings as the pure dataclass (fields not shown here keep their defaults)."""
        return arguments(**{s.name: s.coerce(getattr(self, s.name)) for s in settings})

    def validate_with_dataclass(self):
        self.to_arguments()
        return self

    namespace["to_arguments"] = to_arguments
    namespace["_validate_with_dataclass"] = model_validator(mode="after")(validate_with_dataclass)
    return type(name, (dg.Config,), namespace)


def _config_annotation(setting: Setting) -> Any:
    """The launchpad type: tuples become lists, a str with choices a Literal."""
    base = setting.base
    if setting.sequence_of is not None:
        base = list[setting.sequence_of]
    elif setting.choices is not None and typing.get_origin(base) is not Literal:
        base = Literal[setting.choices]
    return Optional[base] if setting.optional else base


class TrainingConfig(config_class(TrainConfig, "_TrainingSettings", "A training recipe.")):
    """A training recipe (``z0inf_pipeline.training.TrainConfig``) and the MLflow experiment to log it
    to. The defaults are the library's: digits, an MLP, no label noise (the demo adds 10%)."""

    experiment: str = Field(default="z0inf", description="MLflow experiment of the new run")

    def to_train_config(self) -> TrainConfig:
        return self.to_arguments()


GramConfig = config_class(
    InfluenceArguments,
    "GramConfig",
    "Which weights enter the Gram matrix G = W W^T.",
    include=GRAM_SETTINGS,
)

TrainTestConfig = config_class(
    TrainTestArguments,
    "TrainTestConfig",
    "Which train-test method runs (random directions by default) and its settings, chosen on the suite's LDS.",
)


class TopKConfig(config_class(InfluenceArguments, "_TopKSettings", "Loss options and top-k.",
                              exclude=(*GRAM_SETTINGS, *TRAIN_TEST_OWN))):
    """How train-test influence is estimated, and how many proponents and opponents are kept."""

    train_test: TrainTestConfig = Field(default_factory=TrainTestConfig,
                                        description="the train-test method and its settings")

EstimatorConfig = config_class(
    InfluenceArguments,
    "EstimatorConfig",
    "How the per-example signals (self-influence and the loss-table signals) are estimated.",
    exclude=(*GRAM_SETTINGS, "topk"),
)


class FlagPolicyConfig(config_class(FlagPolicy, "_FlagPolicySettings", "Which examples are flagged for review.")):
    """Which examples are flagged for review, and how many may stay unreviewed before retraining is blocked.
    Fixed when a run's queue is first built: another policy later needs ``policy_changed_by`` and is
    refused in any job but ``influence_job``."""

    policy_changed_by: Optional[str] = Field(
        default=None,
        description="reviewer who rebuilds this run's queue with another flag policy (recorded; only in influence_job)",
    )

    def to_policy(self) -> FlagPolicy:
        return self.to_arguments()


PromotionConfig = config_class(
    PromotionPolicy,
    "PromotionConfig",
    "When the retrained model becomes the registered model's champion: the margin and the bootstrap.",
)


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
