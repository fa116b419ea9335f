"""The review flow a team runs, with every shared service on PostgreSQL: contract runs in an
``mlflow server`` on Postgres, Dagster runs in Postgres (``deployment/dagster.yaml``), decisions in
the review store on Postgres. Each record is then read straight from its database."""

from __future__ import annotations

import pandas as pd
import pytest

from z0inf_pipeline.cli import main
from z0inf_pipeline.review import RunLayout
from z0inf_pipeline.review.layout import outputs_base

from .conftest import query

pytestmark = [pytest.mark.postgres, pytest.mark.mlflow_server]


def test_train_influence_review_retrain_on_team_services(
    postgres_dagster_home, postgres_server, postgres_database, mlflow_postgres_server, tmp_path, monkeypatch, capsys
):
    mlflow_url, mlflow_database = mlflow_postgres_server
    review_database = postgres_server.create_database()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    monkeypatch.delenv("Z0INF_MLFLOW_CONFIG", raising=False)
    monkeypatch.setenv("Z0INF_REVIEW_STORE_URL", postgres_server.url(review_database))
    monkeypatch.setenv("Z0INF_DATA_DIR", str(tmp_path / "data"))

    recipe = ["--epochs", "3", "--checkpoints", "4", "--hidden", "16", "--label-noise", "0.1", "--noise-seed", "3"]
    assert main(["train", *recipe, "--experiment", "z0inf-team"]) == 0
    run_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["materialize", "influence", "--run", run_id]) == 0
    assert main(["materialize", "retrain", "--run", run_id]) == 3  # the gate blocks: nothing decided yet
    assert main(["review", "decide", run_id, "--flagged", "--action", "drop"]) == 0
    assert main(["materialize", "retrain", "--run", run_id]) == 0
    capsys.readouterr()

    flagged = len(pd.read_parquet(RunLayout.for_run(run_id, outputs_base()).review_queue))
    assert flagged > 0
    assert query(postgres_server, review_database, "SELECT count(*), min(action), max(action) FROM decisions "
                 "WHERE run_id = %s", (run_id,)) == [(flagged, "drop", "drop")]
    runs = query(postgres_server, postgres_database, "SELECT pipeline_name, status FROM runs ORDER BY create_timestamp")
    assert runs == [("influence_job", "SUCCESS"), ("retrain_job", "FAILURE"), ("retrain_job", "SUCCESS")]
    children = query(postgres_server, mlflow_database, "SELECT r.status FROM runs r JOIN tags t ON r.run_uuid = "
                     "t.run_uuid WHERE t.key = 'z0inf.parent_run_id' AND t.value = %s", (run_id,))
    assert children == [("FINISHED",)]
