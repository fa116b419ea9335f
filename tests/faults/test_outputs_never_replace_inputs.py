"""An output never replaces an input, and a directory is not an output."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from z0inf_pipeline.cli import main
from z0inf_pipeline.errors import InputError
from z0inf_pipeline.influence import LossTable
from z0inf_pipeline.influence.atomic import atomic_output


@pytest.fixture
def files(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir(T=4)
    train = LossTable(np.arange(8), tuple(range(0, 40, 10)), torch.rand(4, 8, generator=torch.Generator().manual_seed(0)))
    return folder, train.write(tmp_path / "train.parquet")


def snapshot(*paths):
    return {p: p.read_bytes() for root in paths for p in (sorted(root.iterdir()) if root.is_dir() else [root])}


def test_an_output_naming_an_input_is_refused_and_nothing_changes(files, tmp_path, capsys):
    folder, train = files
    checkpoint = sorted(folder.iterdir())[0]
    link = tmp_path / "link.parquet"
    link.symlink_to(train)
    before = snapshot(folder, train)
    cases = [
        (["self-influence", folder, train, "-o", checkpoint], f"output {checkpoint}: lies inside the input folder {folder}"),
        (["self-influence", folder, train, "-o", train], f"output {train}: is the input {train}"),
        (["self-influence", folder, train, "-o", folder / ".." / "train.parquet"], "is the input"),
        (["self-influence", folder, train, "-o", link], "is the input"),
        (["gram", folder, "-o", folder / "gram.parquet"], f"lies inside the input folder {folder}"),
        (["train-test", folder, train, train, "-o", folder / "x" / "top.parquet"], "lies inside the input folder"),
    ]
    for argv, message in cases:
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("z0inf: error: output ") and message in err, err
    assert snapshot(folder, train) == before
    assert not (folder / "gram.parquet").exists() and not (folder / "x").exists()


def test_an_output_that_is_a_directory_is_refused(files, tmp_path, capsys):
    folder, train = files
    target = tmp_path / "somewhere"
    target.mkdir()
    assert main(["self-influence", str(folder), str(train), "-o", str(target)]) == 2
    assert f"z0inf: error: output {target}: is a directory" in capsys.readouterr().err
    assert os.listdir(target) == []
    with pytest.raises(InputError, match="is a directory"):
        with atomic_output(target):
            pass
