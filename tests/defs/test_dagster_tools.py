"""The code location loads in Dagster's own tools: `dagster definitions validate` and the webserver's GraphQL API."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import requests

from z0inf_pipeline.review import DecisionStore, RunLayout, read_review_queue
from z0inf_pipeline.review.layout import outputs_base

from .conftest import REPO_ROOT, STAGES, execute

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


@contextmanager
def webserver(dagster_home: Path, tmp_path: Path):
    """A real ``dagster-webserver`` on the project's code location and that DAGSTER_HOME, on a free
    port; yields a function that posts a GraphQL query (with variables) and returns its JSON answer."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_path = tmp_path / "webserver.log"
    log = log_path.open("wb")
    server = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-m", "z0inf_pipeline.definitions"],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "DAGSTER_HOME": str(dagster_home)},
    )
    url = f"http://127.0.0.1:{port}/graphql"

    def post(query: str, variables: dict | None = None) -> dict:
        response = requests.post(url, json={"query": query, "variables": variables or {}}, timeout=120)
        response.raise_for_status()
        return response.json()

    try:
        deadline = time.monotonic() + 600  # a hang guard: the wait ends once it serves, or on the server's exit
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                if (post(QUERY).get("data") or {}).get("assetNodes"):
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "webserver did not serve the code location"
            time.sleep(1)
        yield post
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()


@pytest.mark.dagster_server
def test_webserver_serves_assets_and_checks_over_graphql(dagster_home, tmp_path):
    with webserver(dagster_home, tmp_path) as post:
        data = post(QUERY)["data"]

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


def ui_query(name: str) -> str:
    """The GraphQL document the Dagster UI itself sends as ``name``, read from the webserver's bundled UI
    (the query and every fragment it spreads), so the test sees what the asset graph sees."""
    import dagster_webserver

    bundle = "".join(p.read_text(errors="replace")
                     for p in (Path(dagster_webserver.__file__).parent / "webapp" / "build").rglob("*.js"))

    def definition(kind: str, title: str) -> str:
        found = re.search(r'\["\\n  ' + kind + " " + title + r'\b(.*?)"[,\]]', bundle, re.S)
        assert found, f"the UI bundle of dagster-webserver has no {kind} {title}"
        return (kind + " " + title + found.group(1)).encode().decode("unicode_escape")

    document = definition("query", name)
    while missing := [f for f in re.findall(r"\.\.\.(\w+)", document) if not re.search(rf"fragment {f} on", document)]:
        document += "\n" + definition("fragment", missing[0])
    return document


@pytest.mark.dagster_server
def test_the_asset_graph_shows_curation_and_retraining_materialised_for_each_run(
    dagster_home, instance, contract_run, tracking_uri, tmp_path
):
    # two rounds: the run, then its retrained child, each retrained once the gate is open (the first is
    # blocked at first: its flagged examples have no decision; the child inherits those decisions)
    runs = [contract_run]
    for round_ in range(2):
        run_id = runs[-1]
        assert execute(instance, "influence_job", run_id).success
        attempt = execute(instance, "retrain_job", run_id)
        shut = {e.asset_key.to_user_string() for e in attempt.get_asset_materialization_events()} == {"review_queue"}
        assert attempt.success and (shut or round_ > 0)  # the child may flag an example no one decided yet
        if shut:
            queue, _ = read_review_queue(RunLayout.for_run(run_id, outputs_base()).review_queue)
            DecisionStore.open().record(run_id, queue["example_id"], "keep", reviewer="test")
            assert execute(instance, "retrain_job", run_id).success
        runs.append(str(pd.read_parquet(RunLayout.for_run(run_id, outputs_base()).retrained).at[0, "retrained_run_id"]))
    retrained = runs[:2]  # the grandchild is analysed by nobody here: its partition is not even added

    # the instance's records: one materialisation per retrained run, of both assets
    for asset in ("curated_training_set", "retrained_run"):
        key = dg.AssetKey(asset)
        assert instance.get_materialized_partitions(key) == set(retrained)
        latest = instance.get_latest_materialization_event(key)
        assert latest is not None and latest.dagster_event.partition == retrained[-1]
        records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=10).records
        assert sorted(r.partition_key for r in records) == sorted(retrained)

    # the asset graph's own live query on the real webserver: every partition materialised, none failed
    assets = ["training_run", "review_queue", "curated_training_set", "retrained_run"]
    with webserver(dagster_home, tmp_path) as post:
        answer = post(ui_query("AssetGraphLiveQuery"), {"assetKeys": [{"path": [a]} for a in assets]})
    assert not answer.get("errors"), answer.get("errors")
    nodes = {n["assetKey"]["path"][0]: n for n in answer["data"]["assetNodes"]}
    for asset in assets:
        stats = nodes[asset]["partitionStats"]
        assert stats == {"numMaterialized": 2, "numMaterializing": 0, "numPartitions": 2, "numFailed": 0}, asset
        assert nodes[asset]["assetMaterializations"], asset
    latest = {n["assetKey"]["path"][0]: n for n in answer["data"]["assetsLatestInfo"]}
    assert all(latest[a]["latestRun"]["status"] == "SUCCESS" and not latest[a]["inProgressRunIds"] for a in assets)
