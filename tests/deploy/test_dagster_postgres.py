"""Dagster instance storage on PostgreSQL, configured by the shipped ``deployment/dagster.yaml``: the
project's ``train_job`` and an asset are materialised on it, and runs, events, partitions and
materialisations are read back, through a second instance and straight from the database."""

from __future__ import annotations

import dagster as dg
import pytest
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

from z0inf_pipeline.definitions import defs
from z0inf_pipeline.tracking import list_contract_runs

from .conftest import query

pytestmark = pytest.mark.postgres


def test_train_job_runs_on_a_postgres_instance(postgres_dagster_home, postgres_server, postgres_database,
                                               tracking_uri):
    recipe = {"epochs": 2, "checkpoints": 3, "hidden": [8]}
    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        result = defs.resolve_job_def("train_job").execute_in_process(
            instance=instance, run_config={"ops": {"train_contract_run": {"config": recipe}}}
        )
        assert result.success
        mlflow_run_id = result.output_for_node("train_contract_run")
        instance.add_dynamic_partitions("mlflow_runs", [mlflow_run_id])  # what the sensor does for a new run

    assert [r.run_id for r in list_contract_runs(tracking_uri=tracking_uri)] == [mlflow_run_id]
    with dg.DagsterInstance.get() as reopened:  # another process (webserver, daemon) sees the same record
        run = reopened.get_run_by_id(result.run_id)
        assert run.status == dg.DagsterRunStatus.SUCCESS and run.job_name == "train_job"
        events = [e.dagster_event.event_type_value for e in reopened.all_logs(result.run_id) if e.dagster_event]
        assert "STEP_SUCCESS" in events and events[-1] == dg.DagsterEventType.RUN_SUCCESS.value
        assert reopened.get_dynamic_partitions("mlflow_runs") == [mlflow_run_id]

    rows = query(postgres_server, postgres_database, "SELECT status FROM runs WHERE run_id = %s", (result.run_id,))
    assert rows == [("SUCCESS",)]


@dg.asset
def answer() -> int:
    return 42


def test_materialisations_are_stored_in_postgres(postgres_dagster_home, postgres_server, postgres_database):
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize([answer], instance=instance)
        assert result.success
    with dg.DagsterInstance.get() as reopened:
        event = reopened.get_latest_materialization_event(dg.AssetKey("answer"))
        assert event is not None and event.run_id == result.run_id
    (count,) = query(postgres_server, postgres_database,
                     "SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = %s",
                     (result.run_id, "ASSET_MATERIALIZATION"))[0]
    assert count == 1
