"""Choosing the tracking store: explicit URI > $MLFLOW_TRACKING_URI > mlflow_configs choice > embedded SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

from z0inf_pipeline.errors import InputError
from z0inf_pipeline.tracking import (
    embedded_config,
    ensure_experiment,
    load_mlflow_config,
    resolve_tracking_uri,
    tracking_client,
)
from z0inf_pipeline.tracking.config import artifact_location_for, sqlite_path

CONFIGS = Path(__file__).resolve().parents[2] / "mlflow_configs"


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("Z0INF_MLFLOW_CONFIG", raising=False)
    monkeypatch.setenv("Z0INF_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def test_default_is_sqlite_in_the_data_dir_created_on_first_use(clean_env):
    data = clean_env / "data"
    uri = resolve_tracking_uri()
    assert uri == f"sqlite:///{data / 'mlflow' / 'mlflow.db'}"
    assert not (data / "mlflow").exists()
    client = tracking_client()
    experiment = client.get_experiment(ensure_experiment(client, "z0inf"))
    assert (data / "mlflow" / "mlflow.db").is_file()
    assert experiment.artifact_location == (data / "mlflow" / "artifacts").as_uri()
    assert (data / "mlflow" / "artifacts").is_dir()
    assert ensure_experiment(client, "z0inf") == experiment.experiment_id
    assert load_mlflow_config("embedded") == embedded_config()  # the documented file says what the code does


def test_precedence(clean_env, monkeypatch):
    monkeypatch.setenv("Z0INF_MLFLOW_SERVER", "http://127.0.0.1:5999")
    monkeypatch.setenv("Z0INF_MLFLOW_CONFIG", "server")
    assert resolve_tracking_uri() == "http://127.0.0.1:5999"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/env.db")
    assert resolve_tracking_uri() == "sqlite:////tmp/env.db"
    assert resolve_tracking_uri("http://explicit:1") == "http://explicit:1"


def test_documented_configs_resolve(clean_env, monkeypatch):
    for name, value in [("PGUSER", "u"), ("PGPASSWORD", "p"), ("PGHOST", "db"), ("Z0INF_ARTIFACT_BUCKET", "b")]:
        monkeypatch.setenv(name, value)
    postgres = load_mlflow_config(str(CONFIGS / "postgres.yaml"))
    assert postgres.tracking_uri == "postgresql+psycopg2://u:p@db:5432/mlflow"
    assert postgres.artifact_location == "s3://b/z0inf"
    monkeypatch.setenv("Z0INF_MLFLOW_CONFIG", "postgres")
    assert artifact_location_for(postgres.tracking_uri) == "s3://b/z0inf"
    monkeypatch.delenv("PGHOST")
    with pytest.raises(InputError, match="environment variable that is not set"):
        load_mlflow_config("postgres")
    with pytest.raises(InputError, match="no such file"):
        load_mlflow_config("nope")
    bad = clean_env / "bad.yaml"
    bad.write_text("artifact_location: /x\n")
    with pytest.raises(InputError, match="needs a 'tracking_uri'"):
        load_mlflow_config(str(bad))


def test_sqlite_artifacts_live_beside_the_database(clean_env):
    assert sqlite_path("sqlite:////abs/dir/m.db") == Path("/abs/dir/m.db")
    assert sqlite_path("sqlite:///rel/m.db") == (Path.cwd() / "rel/m.db").resolve()
    assert sqlite_path("http://host:5000") is None
    assert artifact_location_for("sqlite:////abs/dir/m.db") == "file:///abs/dir/artifacts"
    assert artifact_location_for("http://host:5000") is None
