"""``z0inf train`` prints the id of a contract run; ``z0inf runs`` lists contract runs."""

from __future__ import annotations

import re
import subprocess
import sys

import pandas as pd
from mlflow import MlflowClient

from z0inf_pipeline.cli import main
from z0inf_pipeline.tracking import fetch_run


def test_train_command_creates_a_contract_run_and_prints_its_id(tracking_uri, tmp_path):
    command = [sys.executable, "-m", "z0inf_pipeline.cli", "train", "--dataset", "digits", "--model", "mlp",
               "--epochs", "3", "--checkpoints", "5", "--label-noise", "0.1", "--hidden", "32,16"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", run_id), done.stdout  # stdout is the run id alone
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.data.params["hidden"] == "32,16" and run.data.params["label_noise"] == "0.1"
    fetched = fetch_run(run_id, cache_dir=tmp_path / "cache")
    examples = pd.read_parquet(fetched.examples)
    assert examples.flipped.sum() == round(0.1 * (examples.split == "train").sum())
    assert len(fetched.checkpoints) == 5


def test_runs_command_lists_contract_runs(tracking_uri, capsys):
    assert main(["train", "--dataset", "breast_cancer", "--model", "logreg", "--epochs", "2", "--checkpoints", "3",
                 "--experiment", "cli"]) == 0
    run_id = capsys.readouterr().out.strip()
    assert main(["runs"]) == 0
    listing = capsys.readouterr().out
    line = next(row for row in listing.splitlines() if row.startswith(run_id))
    assert "FINISHED" in line and "breast_cancer-logreg" in line
    assert main(["runs", "--experiment", "cli", "--validate"]) == 0
    assert "[valid]" in capsys.readouterr().out
    assert main(["runs", "--experiment", "elsewhere"]) == 0
    assert "no contract runs" in capsys.readouterr().err


def test_bad_arguments_are_reported(tracking_uri, capsys):
    assert main(["train", "--dataset", "/no/such.csv", "--epochs", "1", "--checkpoints", "2"]) == 2
    assert "z0inf: error: dataset /no/such.csv: no such file" in capsys.readouterr().err
