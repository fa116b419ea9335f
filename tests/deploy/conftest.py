"""Fixtures for the team deployment: services backed by the session's real PostgreSQL server."""

from __future__ import annotations

import psycopg2
import pytest

from tests.conftest import running_mlflow_server


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


@pytest.fixture(scope="module")
def mlflow_postgres_server(postgres_server, tmp_path_factory):
    """A real ``mlflow server`` whose backend store is a PostgreSQL database: (url, database name)."""
    database = postgres_server.create_database()
    root = tmp_path_factory.mktemp("mlflow-postgres")
    with running_mlflow_server(root, postgres_server.url(database)) as url:
        yield url, database
