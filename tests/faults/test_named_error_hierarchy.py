"""The named error hierarchy: one base class, the pure core free of services."""

from __future__ import annotations

import subprocess
import sys

import pytest

from z0inf_pipeline import errors
from z0inf_pipeline.review import DecisionStore
from z0inf_pipeline.tracking import ContractError, load_mlflow_config
from z0inf_pipeline.training import TrainConfig


def test_every_named_error_is_a_z0inf_error():
    assert ContractError is errors.ContractError
    for cls in (errors.InputError, errors.ContractError, errors.ConfigurationError, errors.ReviewError,
                errors.ServiceUnavailable, errors.MlflowUnavailable):
        assert issubclass(cls, errors.Z0infError)
    # a bad run, setting or review store is still bad input to code that catches the core's error
    for cls in (errors.ContractError, errors.ConfigurationError, errors.ReviewError):
        assert issubclass(cls, errors.InputError)
    # an unreachable service is not bad input: callers retry instead
    assert not issubclass(errors.MlflowUnavailable, errors.InputError)


def test_raisers_use_the_class_of_their_failure(tmp_path):
    with pytest.raises(errors.ConfigurationError, match="train config: epochs=0"):
        TrainConfig(epochs=0)
    with pytest.raises(errors.ConfigurationError, match="mlflow config 'nope'"):
        load_mlflow_config("nope")
    corrupt = tmp_path / "review.db"
    corrupt.write_bytes(b"this is not a database, just some bytes " * 100)
    with pytest.raises(errors.ReviewError, match=f"review store {corrupt}: cannot be used .*not a database"):
        DecisionStore.open(corrupt)


def test_errors_module_and_the_core_import_neither_mlflow_nor_dagster():
    code = (
        "import sys, z0inf_pipeline.errors, z0inf_pipeline.influence, z0inf_pipeline.influence.analysis;"
        "bad = [m for m in ('mlflow', 'dagster') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
