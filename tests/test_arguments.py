"""One declaration per setting: the launchpad config and the CLI flags are the pydantic settings
models' own (Dagster config is pydantic; pydantic-settings makes the flags), so their names, help,
defaults and validation must equal the model's."""

from __future__ import annotations

import argparse
from typing import Literal

import pytest

from z0inf_pipeline.arguments import Settings
from z0inf_pipeline.cli import build_parser, main
from z0inf_pipeline.cli.arguments import add_settings, settings_from
from z0inf_pipeline.cli.influence import influence_arguments_of
from z0inf_pipeline.defs.config import (
    EstimatorConfig,
    FlagPolicyConfig,
    GramConfig,
    PromotionConfig,
    TopKConfig,
    TrainTestConfig,
    SettingsConfig,
    TrainingConfig,
)
from z0inf_pipeline.errors import ConfigurationError, InputError
from z0inf_pipeline.evaluation.promotion import PromotionPolicy
from z0inf_pipeline.influence.analysis import InfluenceArguments, TrainTestArguments, WindowArguments
from z0inf_pipeline.influence.checkpoints import open_checkpoints, select_parameters
from z0inf_pipeline.review.policy import FlagPolicy
from z0inf_pipeline.training import DEMO_CONFIG, TrainConfig, TrainRecipe, train

INFLUENCE = list(InfluenceArguments.model_fields)
# train-test takes these from TrainTestArguments, not from InfluenceArguments
TRAIN_TEST_OWN = list(WindowArguments.model_fields)
# (launchpad class, the settings it builds, the fields it must show), written out by hand.
LAUNCHPAD = [
    (TrainingConfig, TrainConfig, [n for n in TrainConfig.model_fields if n not in ("exclude_ids", "relabels", "train_subset")]),
    (GramConfig, InfluenceArguments, ["parameters", "center"]),
    (EstimatorConfig, InfluenceArguments, [n for n in INFLUENCE if n not in ("parameters", "center", "topk")]),
    (TopKConfig, InfluenceArguments, [n for n in INFLUENCE if n not in ("parameters", "center", *TRAIN_TEST_OWN)]),
    (TrainTestConfig, TrainTestArguments, list(TrainTestArguments.model_fields)),
    (FlagPolicyConfig, FlagPolicy, list(FlagPolicy.model_fields)),
    (PromotionConfig, PromotionPolicy, list(PromotionPolicy.model_fields)),
]


def _dagster_fields(config_cls) -> dict:
    return config_cls.to_config_schema().as_field().config_type.fields


@pytest.mark.parametrize("config_cls, settings, names", LAUNCHPAD, ids=lambda x: getattr(x, "__name__", ""))
def test_dagster_schema_equals_the_settings_model(config_cls, settings, names):
    schema = _dagster_fields(config_cls)
    declared = settings.model_fields
    assert sorted(n for n in schema if n in declared) == sorted(names)
    for name in names:
        assert schema[name].description == declared[name].description, name
        if declared[name].default is None:
            assert not schema[name].is_required and getattr(config_cls(), name) is None
        else:
            assert schema[name].default_value == declared[name].default, name
    assert config_cls().settings(settings) == settings()


def test_launchpad_classes_declare_no_setting_of_their_own():
    """Every field a launchpad class shows is a core setting, apart from the few launchpad-only ones (how a
    step spreads its work, ``shard_size``, is the pipeline's business, not the estimator's)."""
    launchpad_only = {"experiment", "train_test", "policy_changed_by", "shard_size"}
    for config_cls, settings, _ in LAUNCHPAD:
        own = set(config_cls.model_fields) - set(settings.model_fields) - launchpad_only
        assert not own, (config_cls.__name__, own)
        assert issubclass(config_cls, Settings)


def test_choices_reach_the_launchpad_as_enums():
    schema = _dagster_fields(TrainingConfig)
    assert [v.config_value for v in schema["model"].config_type.enum_values] == ["logreg", "mlp", "cnn"]
    assert [v.config_value for v in _dagster_fields(EstimatorConfig)["eta"].config_type.enum_values] == [
        "uniform", "learning_rate",
    ]


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize(
    "command, settings, names, base",
    [
        ("train", TrainConfig, LAUNCHPAD[0][2], None),
        ("train-test", InfluenceArguments, [n for n in INFLUENCE if n not in TRAIN_TEST_OWN], None),
        ("train-test", TrainTestArguments, list(TrainTestArguments.model_fields), None),
        ("self-influence", InfluenceArguments, [n for n in INFLUENCE if n not in ("topk",)], None),
        ("demo", FlagPolicy, list(FlagPolicy.model_fields), None),
        ("materialize", FlagPolicy, list(FlagPolicy.model_fields), None),
        ("demo", TrainConfig, ["epochs", "checkpoints", "label_noise"], DEMO_CONFIG),
    ],
)
def test_cli_flags_equal_the_settings_model(command, settings, names, base):
    parser = _subparser(command)
    actions = {a.dest: a for a in parser._actions}
    declared = settings.model_fields
    for name in names:
        action = actions[name]
        assert action.help.startswith(declared[name].description.replace("%", "%%")), name
        shown = getattr(base, name) if base is not None else declared[name].default
        assert action.help.endswith(f"(default: {'null' if shown is None else shown})"), name
    if base is not None:
        assert len([a for a in parser._actions if a.dest in declared]) == len(names)  # only the fields asked for


def test_demo_flags_default_to_the_demo_recipe_with_its_noise():
    args = _subparser("demo").parse_args([])
    assert settings_from(args, TrainRecipe, base=DEMO_CONFIG) == DEMO_CONFIG
    assert DEMO_CONFIG.label_noise == 0.1 and TrainConfig().label_noise == 0.0
    args = _subparser("demo").parse_args(["--epochs", "3"])
    assert settings_from(args, TrainRecipe, base=DEMO_CONFIG) == DEMO_CONFIG.replace(epochs=3)


def test_cli_sequences_and_booleans_parse_to_the_settings():
    args = _subparser("train").parse_args(["--hidden", "32,16", "--model", "logreg"])
    assert settings_from(args, TrainRecipe, base=TrainConfig()).hidden == [32, 16]
    args = _subparser("train-test").parse_args(
        ["ckpts", "tr.parquet", "te.parquet", "-o", "x", "--parameters", "3.*", "--parameters", "1.weight",
         "--no-center", "-k", "3", "--neighbors", "4", "--window", "0.2"]
    )
    # the window, k, rule and eta flags of train-test are TrainTestArguments': InfluenceArguments keeps its own
    assert influence_arguments_of(args) == InfluenceArguments(parameters=["3.*", "1.weight"], center=False, topk=3)
    assert settings_from(args, TrainTestArguments, shortcuts=["warmup_fraction"]) == TrainTestArguments(
        neighbors=4, warmup_fraction=0.2
    )


@pytest.mark.parametrize(
    "config_cls, values, field_name",
    [
        (TopKConfig, {"topk": 0}, "topk"),
        (EstimatorConfig, {"neighbors": 0}, "neighbors"),
        (FlagPolicyConfig, {"quantile": 1.5}, "quantile"),
        (TrainingConfig, {"label_noise": 1.0}, "label_noise"),
        (TrainingConfig, {"epochs": 0}, "epochs"),
    ],
)
def test_a_bad_launchpad_value_names_its_field(config_cls, values, field_name):
    with pytest.raises(InputError, match=field_name):
        config_cls(**values)


def test_a_bad_flag_names_its_field(capsys, tmp_path):
    assert main(["self-influence", str(tmp_path), str(tmp_path / "t.parquet"), "-o", "x", "--neighbors", "0"]) == 2
    assert "neighbors=0" in capsys.readouterr().err
    with pytest.raises(InputError, match="model='resnet'"):
        TrainConfig(model="resnet")


class _EverySupportedType(Settings):
    """A stand-in for a setting someone adds later: each kind of field, declared the usual way."""

    switch: bool = False
    count: int = 3
    ratio: float = 0.5
    mode: Literal["fast", "exact"] = "exact"
    limit: int | None = None
    names: list[str] = ["a"]


def test_any_new_field_reaches_the_cli_and_the_launchpad():
    class EveryTypeConfig(_EverySupportedType, SettingsConfig):
        pass

    assert list(_dagster_fields(EveryTypeConfig)) == list(_EverySupportedType.model_fields)
    assert EveryTypeConfig(mode="fast", names=["x"]).settings(_EverySupportedType) == _EverySupportedType(
        mode="fast", names=["x"]
    )
    with pytest.raises(ConfigurationError, match="mode='slow'"):
        EveryTypeConfig(mode="slow")

    parser = argparse.ArgumentParser()
    add_settings(parser, _EverySupportedType)
    assert settings_from(parser.parse_args([]), _EverySupportedType) == _EverySupportedType()
    parsed = parser.parse_args(
        ["--switch", "--count", "4", "--ratio", "0.25", "--mode", "fast", "--limit", "9", "--names", "x,y", "--names", "z"]
    )
    assert settings_from(parsed, _EverySupportedType) == _EverySupportedType(
        switch=True, count=4, ratio=0.25, mode="fast", limit=9, names=["x", "y", "z"]
    )
    with pytest.raises(ConfigurationError, match="mode='slow'"):
        settings_from(parser.parse_args(["--mode", "slow"]), _EverySupportedType)


def test_the_parameters_example_selects_the_last_layer_of_the_default_mlp(tmp_path):
    result = train(TrainConfig(epochs=1, checkpoints=2), tmp_path / "run")
    checkpoints = open_checkpoints(result.checkpoints)
    last = [name for name, _ in result.model.named_parameters()][-2:]  # weight and bias of the output layer
    assert sorted(select_parameters(checkpoints, ["3.*"])) == sorted(last)
    assert result.model[3].out_features == 10
    with pytest.raises(InputError, match="match no floating tensor"):
        select_parameters(checkpoints, ["2.*"])  # the ReLU: no parameters
    assert "'3.*'" in InfluenceArguments.model_fields["parameters"].description


def test_a_bad_recipe_in_the_launchpad_fails_the_run_naming_the_field():
    import dagster as dg

    from z0inf_pipeline.definitions import defs

    result = defs.resolve_job_def("train_job").execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"train_contract_run": {"config": {"checkpoints": 1}}}},
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "checkpoints=1 must be at least 2" in failure.step_failure_data.error.to_string()
