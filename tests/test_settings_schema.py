"""One definition per setting: the launchpad config and the CLI flags are generated from the pure
dataclasses, so their names, help, defaults and validation must equal the dataclass's own."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pydantic
import pytest

from z0inf_pipeline.cli import build_parser, main
from z0inf_pipeline.cli.influence import influence_arguments_of
from z0inf_pipeline.defs.config import (
    EstimatorConfig,
    FlagPolicyConfig,
    GramConfig,
    TopKConfig,
    TrainTestConfig,
    TrainingConfig,
    config_class,
)
from z0inf_pipeline.influence.analysis import TRAIN_TEST_OWN, InfluenceArguments, TrainTestArguments
from z0inf_pipeline.influence.checkpoints import open_checkpoints, select_parameters
from z0inf_pipeline.errors import InputError
from z0inf_pipeline.review.policy import FlagPolicy
from z0inf_pipeline.settings_schema import add_arguments, check_choices, from_namespace, normalise_sequences
from z0inf_pipeline.training import DEMO_CONFIG, TrainConfig, train

# (generated launchpad class, its dataclass, the dataclass fields it must show), written out by hand.
GENERATED = [
    (TrainingConfig, TrainConfig, [f.name for f in dataclasses.fields(TrainConfig)
                                   if f.name not in ("exclude_ids", "relabels", "train_subset")]),
    (GramConfig, InfluenceArguments, ["parameters", "center"]),
    (EstimatorConfig, InfluenceArguments, [f.name for f in dataclasses.fields(InfluenceArguments)
                                           if f.name not in ("parameters", "center", "topk")]),
    (TopKConfig, InfluenceArguments, [f.name for f in dataclasses.fields(InfluenceArguments)
                                      if f.name not in ("parameters", "center", *TRAIN_TEST_OWN)]),
    (TrainTestConfig, TrainTestArguments, [f.name for f in dataclasses.fields(TrainTestArguments)]),
    (FlagPolicyConfig, FlagPolicy, [f.name for f in dataclasses.fields(FlagPolicy)]),
]


def _dagster_fields(config_cls) -> dict:
    return config_cls.to_config_schema().as_field().config_type.fields


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("config_cls, arguments, names", GENERATED, ids=lambda x: getattr(x, "__name__", ""))
def test_dagster_schema_equals_the_dataclass(config_cls, arguments, names):
    schema = _dagster_fields(config_cls)
    declared = {f.name: f for f in dataclasses.fields(arguments)}
    assert [n for n in schema if n in declared] == names
    for name in names:
        assert schema[name].description == declared[name].metadata["help"], name
        if declared[name].default is None:
            assert not schema[name].is_required and config_cls().__getattribute__(name) is None
        else:
            assert schema[name].default_value == _plain(declared[name].default), name
    assert config_cls().to_arguments() == arguments()


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
    "command, arguments, names, base",
    [
        ("train", TrainConfig, [n for n in GENERATED[0][2]], TrainConfig()),
        ("train-test", InfluenceArguments, [f.name for f in dataclasses.fields(InfluenceArguments)
                                            if f.name not in TRAIN_TEST_OWN], None),
        ("train-test", TrainTestArguments, [f.name for f in dataclasses.fields(TrainTestArguments)], None),
        ("self-influence", InfluenceArguments, [f.name for f in dataclasses.fields(InfluenceArguments)
                                                if f.name not in ("center", "topk")], None),
        ("demo", FlagPolicy, [f.name for f in dataclasses.fields(FlagPolicy)], None),
        ("materialize", FlagPolicy, [f.name for f in dataclasses.fields(FlagPolicy)], None),
        ("demo", TrainConfig, ["epochs", "checkpoints", "label_noise"], DEMO_CONFIG),
    ],
)
def test_cli_flags_equal_the_dataclass(command, arguments, names, base):
    parser = _subparser(command)
    actions = {a.dest: a for a in parser._actions}
    declared = {f.name: f for f in dataclasses.fields(arguments)}
    for name in names:
        action = actions[name]
        expected = getattr(base, name) if base is not None else declared[name].default
        assert action.default == expected, name
        assert action.help.startswith(declared[name].metadata["help"].replace("%", "%%")), name


def test_demo_flags_default_to_the_demo_recipe_with_its_noise():
    args = _subparser("demo").parse_args([])
    assert from_namespace(TrainConfig, args, base=DEMO_CONFIG) == DEMO_CONFIG
    assert DEMO_CONFIG.label_noise == 0.1 and TrainConfig().label_noise == 0.0


def test_cli_sequences_and_booleans_parse_to_the_dataclass():
    args = _subparser("train").parse_args(["--hidden", "32,16", "--model", "logreg"])
    assert from_namespace(TrainConfig, args).hidden == (32, 16)
    args = _subparser("train-test").parse_args(
        ["ckpts", "tr.parquet", "te.parquet", "-o", "x", "--parameters", "3.*", "1.weight", "--no-center", "-k", "3",
         "--neighbors", "4", "--window", "0.2"]
    )
    # the window, k, rule and eta flags of train-test are TrainTestArguments': InfluenceArguments keeps its own
    assert influence_arguments_of(args) == InfluenceArguments(parameters=("3.*", "1.weight"), center=False, topk=3)
    assert from_namespace(TrainTestArguments, args) == TrainTestArguments(neighbors=4, warmup_fraction=0.2)


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
    with pytest.raises(pydantic.ValidationError, match=field_name):
        config_cls(**values)


def test_a_bad_flag_names_its_field(capsys, tmp_path):
    assert main(["self-influence", str(tmp_path), str(tmp_path / "t.parquet"), "-o", "x", "--neighbors", "0"]) == 2
    assert "neighbors=0" in capsys.readouterr().err
    with pytest.raises(InputError, match="model='resnet'"):
        TrainConfig(model="resnet")


@dataclass(frozen=True)
class _EverySupportedType:
    """A stand-in for a field someone adds later: every supported annotation, declared the same way."""

    switch: bool = field(default=False, metadata={"help": "a switch"})
    count: int = field(default=3, metadata={"help": "a count"})
    ratio: float = field(default=0.5, metadata={"help": "a ratio"})
    colour: str = field(default="red", metadata={"help": "a colour", "choices": ("red", "blue")})
    mode: Literal["fast", "exact"] = field(default="exact", metadata={"help": "a mode"})
    limit: int | None = field(default=None, metadata={"help": "an optional limit"})
    names: tuple[str, ...] = field(default=("a",), metadata={"help": "names"})
    sizes: tuple[int, ...] | None = field(default=None, metadata={"help": "optional sizes"})
    hidden: tuple[int, ...] = field(default=(), metadata={"help": "python only", "python_only": True})

    def __post_init__(self):
        normalise_sequences(self)
        check_choices(self, "test settings")


def test_any_new_field_is_picked_up_by_both_generators():
    config_cls = config_class(_EverySupportedType, "EverySupportedConfig", "test")
    shown = ["switch", "count", "ratio", "colour", "mode", "limit", "names", "sizes"]
    assert list(config_cls.model_fields) == shown
    assert config_cls().to_arguments() == _EverySupportedType()
    launched = config_cls(switch=True, colour="blue", mode="fast", limit=4, names=["x", "y"], sizes=[1, 2])
    assert launched.to_arguments() == _EverySupportedType(True, 3, 0.5, "blue", "fast", 4, ("x", "y"), (1, 2))
    with pytest.raises(pydantic.ValidationError, match="colour"):
        config_cls(colour="green")

    parser = argparse.ArgumentParser()
    add_arguments(parser, _EverySupportedType)
    assert from_namespace(_EverySupportedType, parser.parse_args([])) == _EverySupportedType()
    parsed = parser.parse_args(
        ["--switch", "--count", "4", "--ratio", "0.25", "--colour", "blue", "--mode", "fast", "--limit", "9",
         "--names", "x,y", "z", "--sizes", "5"]
    )
    assert from_namespace(_EverySupportedType, parsed) == _EverySupportedType(
        True, 4, 0.25, "blue", "fast", 9, ("x", "y", "z"), (5,)
    )
    assert "--hidden" not in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--colour", "green"])


def test_the_parameters_example_selects_the_last_layer_of_the_default_mlp(tmp_path):
    result = train(dataclasses.replace(TrainConfig(), epochs=1, checkpoints=2), tmp_path / "run")
    checkpoints = open_checkpoints(result.checkpoints)
    last = [name for name, _ in result.model.named_parameters()][-2:]  # weight and bias of the output layer
    assert sorted(select_parameters(checkpoints, ["3.*"])) == sorted(last)
    assert result.model[3].out_features == 10
    with pytest.raises(InputError, match="match no floating tensor"):
        select_parameters(checkpoints, ["2.*"])  # the ReLU: no parameters
    assert "'3.*'" in InfluenceArguments.__dataclass_fields__["parameters"].metadata["help"]


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
