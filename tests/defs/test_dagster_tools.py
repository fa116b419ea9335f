"""The code location loads in Dagster's own tools: `dagster definitions validate` and the webserver's GraphQL API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from .conftest import REPO_ROOT, STAGES

BIN = Path(sys.executable).parent
ASSETS = {"training_run", *STAGES}
CHECKS = {
    ("loss_tables", "loss_tables_are_valid", True),
    ("weight_gram", "gram_is_valid", True),
    ("self_influence", "self_influence_is_valid", True),
    ("train_test_influence", "train_test_influence_is_valid", True),
    ("review_queue", "review_gate", False),  # a shut gate skips curation; it does not fail the run
    ("curated_training_set", "curated_set_matches_decisions", True),
    ("retrained_run", "retrained_run_follows_curation", False),
    ("model_promotion", "retrained_model_is_champion", False),
}
QUERY = """{
  assetNodes { assetKey { path } assetChecksOrError { ... on AssetChecks { checks { name blocking } } } }
  repositoriesOrError { ... on RepositoryConnection { nodes { jobs { name } sensors { name } } } }
}"""


def test_definitions_validate_in_the_repository_root(dagster_home):
    result = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DAGSTER_HOME": str(dagster_home)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All code locations passed validation" in result.stdout + result.stderr


@pytest.mark.dagster_server
def test_webserver_serves_assets_and_checks_over_graphql(dagster_home, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (tmp_path / "webserver.log").open("wb")
    server = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-m", "z0inf_pipeline.definitions"],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "DAGSTER_HOME": str(dagster_home)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # a hang guard: the wait ends once it serves, or on the server's exit
        data = None
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "webserver.log").read_text()[-3000:]
            try:
                response = requests.post(f"{url}/graphql", json={"query": QUERY}, timeout=10)
                data = response.json().get("data") if response.ok else None
            except requests.RequestException:
                data = None
            if data and data["assetNodes"]:
                break
            time.sleep(1)
        assert data and data["assetNodes"], "webserver did not serve the code location in time"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()

    assert {"/".join(n["assetKey"]["path"]) for n in data["assetNodes"]} == ASSETS
    checks = {
        ("/".join(n["assetKey"]["path"]), c["name"], c["blocking"])
        for n in data["assetNodes"]
        for c in n["assetChecksOrError"]["checks"]
    }
    assert checks == CHECKS
    repository = data["repositoriesOrError"]["nodes"][0]
    assert {"influence_job", "retrain_job", "pipeline_job", "train_job"} <= {j["name"] for j in repository["jobs"]}
    assert sorted(s["name"] for s in repository["sensors"]) == ["new_mlflow_runs", "orphaned_runs"]
