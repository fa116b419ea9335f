"""An ``mlflow server`` backed by PostgreSQL: a contract run logged through it is listed, validated
and fetched back, and its rows are in the database itself."""

from __future__ import annotations

import pytest

from z0inf_pipeline.tracking import fetch_run, list_contract_runs, train_and_log, validate_run
from z0inf_pipeline.training import TrainConfig

from .conftest import query

pytestmark = [pytest.mark.postgres, pytest.mark.mlflow_server]

TINY = TrainConfig(epochs=2, checkpoints=3, hidden=(8,))


def test_a_contract_run_goes_through_a_postgres_backed_server(mlflow_postgres_server, postgres_server, tmp_path,
                                                              monkeypatch):
    url, database = mlflow_postgres_server
    monkeypatch.setenv("Z0INF_DATA_DIR", str(tmp_path / "data"))
    run_id = train_and_log(TINY, tracking_uri=url, experiment="z0inf-deploy")

    assert [r.run_id for r in list_contract_runs(tracking_uri=url, experiment_names=["z0inf-deploy"])] == [run_id]
    files = validate_run(run_id, tracking_uri=url)  # downloads every artifact through the server
    assert len(files.checkpoints) == TINY.checkpoints
    fetched = fetch_run(run_id, tracking_uri=url)
    assert fetched.steps == files.steps and all(path.is_file() for path in fetched.checkpoints)
    assert TrainConfig.from_dict(fetched.train_config) == TINY

    # the record lives in PostgreSQL, not in a file beside the server
    rows = query(postgres_server, database, "SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
    assert rows == [("FINISHED",)]
    metrics = {k for (k,) in query(postgres_server, database, "SELECT key FROM metrics WHERE run_uuid = %s",
                                   (run_id,))}
    assert "test_accuracy" in metrics
