"""Every expected failure ends as ``z0inf: error: ...`` with exit status 2, no traceback;
``--debug`` shows the traceback."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from z0inf_pipeline.cli import main
from z0inf_pipeline.influence import LossTable, save_checkpoint
from z0inf_pipeline.tracking import train_and_log
from z0inf_pipeline.training import TrainConfig


def fails_cleanly(capsys, argv, *fragments) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("z0inf: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in last, last
    return last


@pytest.fixture
def core_files(tmp_path):
    folder = tmp_path / "ckpts"
    for step in range(3):
        save_checkpoint(folder / f"s{step}.safetensors", {"w": torch.randn(4)}, step=step)
    train = LossTable(np.arange(5), (0, 1, 2), torch.rand(3, 5)).write(tmp_path / "train.parquet")
    empty = LossTable(np.arange(0), (0, 1, 2), torch.zeros(3, 0)).write(tmp_path / "empty.parquet")
    return folder, train, empty


def test_a_float_data_offset(core_files, tmp_path, capsys):
    folder, _, _ = core_files
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16.0]},
                         "__metadata__": {"step": "9"}}).encode()
    (folder / "float.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    fails_cleanly(capsys, ["gram", folder, "-o", tmp_path / "g.parquet"], "float.safetensors", "non-integer data offsets")


def test_an_output_that_is_a_directory(core_files, tmp_path, capsys):
    folder, train, _ = core_files
    fails_cleanly(capsys, ["self-influence", folder, train, "-o", tmp_path], f"output {tmp_path}: is a directory")


def test_zero_row_train_or_test_tables(core_files, tmp_path, capsys):
    folder, train, empty = core_files
    out = tmp_path / "out.parquet"
    fails_cleanly(capsys, ["self-influence", folder, empty, "-o", out], "empty.parquet: has no rows")
    fails_cleanly(capsys, ["train-test", folder, empty, train, "-o", out], "empty.parquet: has no rows")
    fails_cleanly(capsys, ["train-test", folder, train, empty, "-o", out], "empty.parquet: has no rows")
    assert not out.exists()


def test_an_unwritable_data_dir(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("Z0INF_DATA_DIR", str(blocker / "data"))
    fails_cleanly(capsys, ["review", "list"], f"data directory {blocker / 'data'}", "cannot be created")


def test_a_corrupt_review_store(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("Z0INF_DATA_DIR", str(tmp_path))
    (tmp_path / "review.db").write_bytes(os.urandom(4096))
    fails_cleanly(capsys, ["review", "list"], f"review store {tmp_path / 'review.db'}", "file is not a database")
    # --debug: the same failure with its traceback, for a developer
    result = subprocess.run([sys.executable, "-m", "z0inf_pipeline.cli", "--debug", "review", "list"],
                            capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode != 0 and "Traceback" in result.stderr and "ReviewError" in result.stderr


def test_a_symlink_loop_in_the_artifact_store(tracking_uri, dagster_home, tmp_path, capsys):
    run_id = train_and_log(TrainConfig(epochs=1, checkpoints=2, hidden=(4,)), tracking_uri=tracking_uri)
    artifacts = next((tmp_path / "mlflow").rglob(f"{run_id}/artifacts"))
    (artifacts / "loop").symlink_to("loop")
    assert main(["runs", "--validate"]) == 0  # a listing: the run is shown as invalid, with the reason
    assert "Too many levels of symbolic links" in capsys.readouterr().out
    fails_cleanly(capsys, ["materialize", "influence", "--run", run_id],
                  "training_run: ", f"run {run_id}: cannot list artifacts", "symbolic links")
