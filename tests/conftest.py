"""Shared fixtures: real MLflow tracking stores (a SQLite file, or an ``mlflow server`` on 127.0.0.1)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

# A hang guard, not an expectation: a start is awaited until the server answers or its process exits,
# so a busy machine only makes it slower (the guard ends a server that neither answers nor exits).
SERVER_START_TIMEOUT_S = 600


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "mlflow_server: starts a real `mlflow server` subprocess on 127.0.0.1 (deselect with -m 'not mlflow_server')",
    )
    config.addinivalue_line(
        "markers",
        "postgres: starts a real PostgreSQL server (Debian's `postgresql`) in a temp folder "
        "(deselect with -m 'not postgres')",
    )


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store under tmp_path (artifacts land in the ``artifacts`` folder beside it).

    Also exported as ``$MLFLOW_TRACKING_URI`` and ``$Z0INF_DATA_DIR`` points into tmp_path, so code
    that resolves the store itself (CLI, Dagster resources) uses this store and nothing under ./data.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("Z0INF_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("Z0INF_MLFLOW_CONFIG", raising=False)
    return uri


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` (SQLite backend, proxied artifacts in a temp folder) for the whole session."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with running_mlflow_server(root, f"sqlite:///{root / 'mlflow.db'}") as url:
        yield url


@contextmanager
def running_mlflow_server(root: Path, backend_store_uri: str) -> Iterator[str]:
    """An ``mlflow server`` on ``backend_store_uri``, artifacts proxied into ``root``; yields its URL.

    Started on a free port of 127.0.0.1 and ready once ``/health`` answers; a server that exits while
    starting (say, another process took the port first) is retried on a new port. Its whole process
    group is ended at the end. If it never comes up, the test fails with the server's own log.
    """
    for attempt in range(3):
        process, url, log_path = _start_server(root, attempt, backend_store_uri)
        try:
            healthy = _wait_healthy(process, url)
            exited_while_starting = process.poll() is not None
            if healthy:
                yield url
                return
        finally:
            _stop(process)
        if not exited_while_starting:  # alive but never healthy: retrying will not help
            break
    pytest.fail(f"mlflow server did not start within {SERVER_START_TIMEOUT_S}s:\n{_tail(log_path)}")


def _start_server(root: Path, attempt: int, backend_store_uri: str):
    port = _free_port()
    log_path = root / f"server-{attempt}.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    # no GenAI job runner: it spawns a pool of worker processes this store never uses
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env,
                                   start_new_session=True)
    return process, f"http://127.0.0.1:{port}", log_path


def _wait_healthy(process: subprocess.Popen, url: str) -> bool:
    import requests

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """End the server and the workers it spawned (they share its new session's process group)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)
    except ProcessLookupError:
        pass


def _tail(path: Path, size: int = 4000) -> str:
    return path.read_bytes()[-size:].decode(errors="replace")


# --- PostgreSQL: Debian's server, initialised in a temporary folder for the session -------------------

POSTGRES_REQUIRED_ENV = "Z0INF_REQUIRE_POSTGRES"  # .ci/run sets it: a missing server fails instead of skipping
POSTGRES_USER = "postgres"  # the unprivileged account that owns the cluster when the tests run as root


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL on 127.0.0.1 with password authentication; ``create_database`` gives each
    test its own database."""

    port: int
    user: str
    password: str

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg2

        name = f"z0inf_{uuid.uuid4().hex[:12]}"
        conn = psycopg2.connect(self.url("postgres", driver="postgresql"), connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return name


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """Debian's PostgreSQL, initialised by ``initdb`` in a fresh temp folder and started with ``pg_ctl``
    on a free port of 127.0.0.1 (as the unprivileged ``postgres`` account when run as root, since
    initdb refuses root); stopped and removed at teardown. Skips only where the server is not
    installed and ``$Z0INF_REQUIRE_POSTGRES`` is unset (CI sets it)."""
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not binaries:
        message = "PostgreSQL server binaries not found under /usr/lib/postgresql (apt-get install postgresql)"
        if os.environ.get(POSTGRES_REQUIRED_ENV):
            pytest.fail(message)
        pytest.skip(message)
    bin_dir = binaries[-1].parent
    as_user = ["runuser", "-u", POSTGRES_USER, "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="z0inf-pg-"))
    password = uuid.uuid4().hex
    try:
        (root / "password").write_text(password)
        if as_user:
            shutil.chown(root, POSTGRES_USER)
            shutil.chown(root / "password", POSTGRES_USER)
        _run([*as_user, str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "z0inf", "-E", "UTF8",
              "--no-locale", "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={root / 'password'}"])
        server = None
        for _ in range(3):  # another process may take the free port before the server binds it
            port = _free_port()
            options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
            started = subprocess.run(
                [*as_user, str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "server.log"),
                 "-o", options, "-w", "-t", "60", "start"],
                capture_output=True, text=True, timeout=90,
            )
            if started.returncode == 0:
                server = PostgresServer(port, "z0inf", password)
                break
        if server is None:
            pytest.fail(f"PostgreSQL did not start:\n{_tail(root / 'server.log')}")
        try:
            yield server
        finally:
            subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "-w",
                            "stop"], capture_output=True, timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


# --- Redis: Debian's server, started in a temporary folder for the session -----------------------------

REDIS_REQUIRED_ENV = "Z0INF_REQUIRE_REDIS"  # .ci/run sets it: a missing server fails instead of skipping


@dataclass(frozen=True)
class RedisServer:
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """Debian's ``redis-server`` on a free port of 127.0.0.1, its files in a fresh temp folder, nothing
    persisted; ready once it answers PING, stopped and removed at teardown. Skips only where the server is
    not installed and ``$Z0INF_REQUIRE_REDIS`` is unset (CI sets it)."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server not found (apt-get install redis-server)"
        if os.environ.get(REDIS_REQUIRED_ENV):
            pytest.fail(message)
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="z0inf-redis-"))
    try:
        for attempt in range(3):  # another process may take the free port before the server binds it
            port = _free_port()
            log_path = root / f"redis-{attempt}.log"
            process = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(root), "--save", "",
                 "--appendonly", "no", "--daemonize", "no", "--logfile", str(log_path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
            )
            try:
                client = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)
                deadline = time.monotonic() + SERVER_START_TIMEOUT_S
                while process.poll() is None and time.monotonic() < deadline:
                    try:
                        if client.ping():
                            yield RedisServer(port)
                            return
                    except redis.RedisError:
                        time.sleep(0.2)
            finally:
                _stop(process)
        pytest.fail(f"redis-server did not start:\n{_tail(log_path)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
