"""Fixtures for the team deployment: services backed by the session's real PostgreSQL server."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg2
import pytest

from tests.conftest import running_mlflow_server

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def postgres_database(postgres_server) -> str:
    """A fresh, empty database on the session's PostgreSQL server; its name."""
    return postgres_server.create_database()


def query(server, database: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of ``sql`` asked of the database directly, past every client under test."""
    conn = psycopg2.connect(server.url(database, driver="postgresql"), connect_timeout=10)
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="session")
def mlflow_postgres_server(postgres_server, tmp_path_factory):
    """A real ``mlflow server`` whose backend store is a PostgreSQL database: (url, database name)."""
    database = postgres_server.create_database()
    root = tmp_path_factory.mktemp("mlflow-postgres")
    with running_mlflow_server(root, postgres_server.url(database)) as url:
        yield url, database


@pytest.fixture
def postgres_dagster_home(tmp_path, monkeypatch, postgres_server, postgres_database) -> Path:
    """$DAGSTER_HOME holding the shipped team instance config, its DAGSTER_PG_* pointing at the fixture."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "deployment" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    for name, value in {
        "USERNAME": postgres_server.user,
        "PASSWORD": postgres_server.password,
        "HOST": "127.0.0.1",
        "PORT": str(postgres_server.port),
        "DB": postgres_database,
    }.items():
        monkeypatch.setenv(f"DAGSTER_PG_{name}", value)
    return home
