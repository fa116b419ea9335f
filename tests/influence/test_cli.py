"""``z0inf gram | self-influence | train-test`` on real files, through the console script."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from z0inf_pipeline.influence import LossTable, gram_matrix, self_influence, train_test_influence, warmup_window
from z0inf_pipeline.influence.analysis import InfluenceArguments, TrainTestArguments


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "z0inf_pipeline.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def run_files(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir(T=5)
    gen = torch.Generator().manual_seed(0)
    train = LossTable(np.arange(10, 30), tuple(range(0, 50, 10)), torch.rand(5, 20, generator=gen))
    test = LossTable(np.arange(500, 506), train.steps, torch.rand(5, 6, generator=gen))
    return folder, train, train.write(tmp_path / "train.parquet"), test, test.write(tmp_path / "test.parquet")


def test_help_answers_for_every_command():
    for command in ([], ["gram"], ["self-influence"], ["train-test"]):
        result = run_cli(*command, "--help")
        assert result.returncode == 0 and "usage: z0inf" in result.stdout


def test_cli_scores_match_the_library(run_files, tmp_path):
    folder, train, train_path, test, test_path = run_files
    defaults = InfluenceArguments()
    keep = torch.from_numpy(warmup_window(train.steps, defaults.warmup_fraction))  # the default window
    G = gram_matrix(folder)[keep][:, keep]
    train_values, test_values = train.values[keep], test.values[keep]
    # 5 checkpoints, 4 in the window: the default k = 12 is lowered to the 3 other checkpoints.
    assert len(keep) == 4 and defaults.neighbors > 3
    estimator = dict(neighbors=3, neighbor_rule=defaults.neighbor_rule)
    assert run_cli("gram", folder, "-o", tmp_path / "g.parquet").returncode == 0
    result = run_cli("self-influence", folder, train_path, "-o", tmp_path / "si.parquet", "--gram", tmp_path / "g.parquet")
    assert result.returncode == 0, result.stderr
    assert "NeighborsClampedWarning" in result.stderr and "using k=3" in result.stderr
    si = pd.read_parquet(tmp_path / "si.parquet")
    np.testing.assert_array_equal(si["example_id"], train.example_ids)
    np.testing.assert_allclose(si["mean_loss"], train.values.mean(dim=0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(si["self_influence"], self_influence(G, train_values, **estimator).numpy(), rtol=1e-6)

    result = run_cli("train-test", folder, train_path, test_path, "-o", tmp_path / "tt.parquet", "-k", "3")
    assert result.returncode == 0, result.stderr
    top = pd.read_parquet(tmp_path / "tt.parquet")
    # no model from files: the trajectory answers, over the train-test window (its own default)
    train_test = TrainTestArguments()
    keep = torch.from_numpy(warmup_window(train.steps, train_test.warmup_fraction))
    G = gram_matrix(folder)[keep][:, keep]
    estimator = dict(neighbors=min(train_test.neighbors, len(keep) - 1), neighbor_rule=train_test.neighbor_rule)
    full = train_test_influence(G, train.values[keep], test.values[keep], **estimator).numpy()  # (N, M)
    for m, test_id in enumerate(test.example_ids):
        rows = top[top["test_example_id"] == test_id].sort_values("rank")
        np.testing.assert_array_equal(rows["proponent_id"], train.example_ids[np.argsort(-full[:, m], kind="stable")[:3]])
        np.testing.assert_array_equal(rows["opponent_id"], train.example_ids[np.argsort(full[:, m], kind="stable")[:3]])


def test_errors_name_the_input_and_leave_no_output(run_files, tmp_path):
    folder, train, train_path, test, test_path = run_files
    (folder / "evil.safetensors").write_bytes(b"\x80\x04garbage")
    out = tmp_path / "si.parquet"
    result = run_cli("self-influence", folder, train_path, "-o", out)
    assert result.returncode == 2
    assert "evil.safetensors" in result.stderr and "pickle" in result.stderr
    (folder / "evil.safetensors").unlink()
    shutil.copy(sorted(folder.glob("*"))[0], folder / "extra.safetensors")
    result = run_cli("self-influence", folder, train_path, "-o", out)
    assert result.returncode == 2 and "both claim step 0" in result.stderr
    (folder / "extra.safetensors").unlink()
    result = run_cli("self-influence", folder, train_path, "-o", out, "--neighbors", "0")
    assert result.returncode == 2 and "neighbors=0 Input should be greater than or equal to 1" in result.stderr
    shifted = LossTable(train.example_ids, (0, 10, 20, 30, 45), train.values).write(tmp_path / "shifted.parquet")
    result = run_cli("self-influence", folder, shifted, "-o", out)
    assert result.returncode == 2 and "shifted.parquet" in result.stderr
    assert "missing columns ['step_40']" in result.stderr and "extra columns ['step_45']" in result.stderr
    values = train.values.clone()
    values[3, 7] = float("nan")
    nan_table = LossTable(train.example_ids, train.steps, values).write(tmp_path / "nan.parquet")
    result = run_cli("self-influence", folder, nan_table, "-o", out)
    assert result.returncode == 2 and "nan.parquet: column 'step_30' has 1 NaN/inf values (first at example_id 17)" in result.stderr
    result = run_cli("self-influence", folder, train_path, "-o", out, "--gram", train_path)
    assert result.returncode == 2 and "gram file" in result.stderr and "has no 'step' column" in result.stderr
    result = run_cli("self-influence", folder, train_path, "-o", out, "--gram", tmp_path / "absent.parquet")
    assert result.returncode == 2 and "absent.parquet: not a readable parquet file" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".si.parquet*"))


def test_full_matrix_from_files_is_the_trajectory_and_says_so(run_files, tmp_path):
    """From files there is no model to run forward passes on: the full N x M matrix is trajectory-only
    Z0-Inf at the train-test window, and the output says so."""
    folder, train, train_path, test, test_path = run_files
    out = tmp_path / "full.parquet"
    result = run_cli("train-test", folder, train_path, test_path, "-o", out, "--full", "--window", "0", "--neighbors", "2",
                     "--neighbor-rule", "distance")
    assert result.returncode == 0, result.stderr
    assert "no model factory" in result.stdout and "method trajectory" in result.stdout
    frame = pd.read_parquet(out)
    assert frame["example_id"].tolist() == train.example_ids.tolist()
    assert list(frame.columns[1:]) == [str(i) for i in test.example_ids]
    expected = train_test_influence(gram_matrix(folder), train.values, test.values, 2, neighbor_rule="distance")
    np.testing.assert_allclose(frame.iloc[:, 1:].to_numpy(), expected.numpy(), rtol=1e-5)


def test_full_matrix_above_the_limit_is_refused_with_the_size(run_files, tmp_path, monkeypatch):
    from z0inf_pipeline.cli import influence as command

    folder, train, train_path, test, test_path = run_files
    monkeypatch.setattr(command, "FULL_MATRIX_LIMIT", 100)  # 20 x 6 = 120 entries
    parser = command.argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["train-test", str(folder), str(train_path), str(test_path), "-o", str(tmp_path / "x.parquet"),
                              "--full"])
    with pytest.raises(command.InputError, match="20 x 6 = 120 entries is above the limit of 100"):
        args.handler(args)
    assert not (tmp_path / "x.parquet").exists()


def test_train_test_needs_files_or_a_run(tmp_path):
    result = run_cli("train-test", "-o", tmp_path / "x.parquet")
    assert result.returncode == 2 and "or --run RUN_ID" in result.stderr
