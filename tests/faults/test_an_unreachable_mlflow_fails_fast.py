"""An unreachable MLflow is a named error within seconds, for the CLI and the assets.

Port 9 (discard) on 127.0.0.1 has no listener here: connections are refused at once, which is what a
stopped server looks like. The < 15 s bound is the acceptance criterion of a time bound, not a speed target.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from z0inf_pipeline.errors import MlflowUnavailable
from z0inf_pipeline.tracking import fetch_run, tracking_client
from z0inf_pipeline.tracking.client import HTTP_BOUNDS
from tests.defs.conftest import execute

DEAD = "http://127.0.0.1:9"
BOUND_S = 15


@pytest.fixture
def dead_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD)
    monkeypatch.setenv("Z0INF_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("Z0INF_MLFLOW_CONFIG", raising=False)
    for name in HTTP_BOUNDS:
        monkeypatch.delenv(name, raising=False)
    return DEAD


@pytest.mark.parametrize(
    "argv",
    [
        ["runs"],
        ["runs", "--validate", "--all"],
        ["train", "--epochs", "1", "--checkpoints", "2"],
        ["materialize", "influence", "--run", uuid.uuid4().hex],
    ],
    ids=["runs", "runs-validate", "train", "materialize"],
)
def test_cli_commands_fail_fast_with_a_named_error(dead_mlflow, dagster_home, argv):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "z0inf_pipeline.cli", *argv], capture_output=True, text=True,
                            env=os.environ.copy(), timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"z0inf: error: MLflow at {DEAD} is unreachable")
    assert "Traceback" not in result.stderr
    assert elapsed < BOUND_S, f"{argv}: {elapsed:.1f} s"


def test_library_calls_and_bounded_retries(dead_mlflow, tmp_path):
    with pytest.raises(MlflowUnavailable, match=f"MLflow at {DEAD} is unreachable"):
        tracking_client()
    with pytest.raises(MlflowUnavailable):
        fetch_run(uuid.uuid4().hex, cache_dir=tmp_path / "cache")
    assert {name: os.environ[name] for name in HTTP_BOUNDS} == HTTP_BOUNDS  # set for every later MLflow request


def test_a_user_choice_of_mlflow_retries_wins(dead_mlflow, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowUnavailable):
        tracking_client()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"


def test_an_asset_fails_fast_naming_the_unreachable_store(dead_mlflow, instance):
    started = time.monotonic()
    result = execute(instance, "influence_job", uuid.uuid4().hex)
    elapsed = time.monotonic() - started
    assert not result.success
    failures = [e.step_failure_data.error for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    cause = failures[0].cause  # Dagster wraps the asset's own exception
    assert cause.cls_name == "MlflowUnavailable" and f"MLflow at {DEAD} is unreachable" in cause.message
    assert elapsed < BOUND_S
