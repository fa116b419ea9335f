"""An MLflow store whose artifact location stops taking writes during `z0inf train` ends as
``z0inf: error: ...`` (a StorageError, exit 2, no traceback) and the run is marked FAILED, not left
RUNNING. Real SQLite store, the real CLI in a subprocess. chmod does not stop root, so the artifact
location lies under a regular file: creating it fails for any user (NotADirectoryError)."""

from __future__ import annotations

import os
import subprocess
import sys

from mlflow import MlflowClient

EXPERIMENT = "unwritable-artifacts"


def test_an_unwritable_artifact_store_fails_train_with_a_named_error_and_a_failed_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the artifact folder's parent should be")
    client = MlflowClient(uri)
    experiment = client.create_experiment(EXPERIMENT, artifact_location=str(blocker / "artifacts"))

    done = subprocess.run(
        [sys.executable, "-m", "z0inf_pipeline.cli", "train", "--tracking-uri", uri, "--experiment", EXPERIMENT,
         "--epochs", "2", "--checkpoints", "2", "--hidden", "8"],
        env={**os.environ, "Z0INF_DATA_DIR": str(tmp_path / "data"), "Z0INF_MLFLOW_CONFIG": ""},
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("z0inf: error: MLflow store ") and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "cannot be written" in last and "the run is marked FAILED" in last, last
    runs = client.search_runs([experiment])
    assert len(runs) == 1 and runs[0].info.status == "FAILED" and runs[0].info.run_id in last
