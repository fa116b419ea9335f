"""Inputs that used to give wrong scores with exit status 0 are now refused by name."""

from __future__ import annotations

import json
import struct

import numpy as np
import pandas as pd
import pytest
import torch

from z0inf_pipeline.cli import main
from z0inf_pipeline.errors import InputError
from z0inf_pipeline.influence import LossTable, gram_matrix, save_checkpoint, self_influence
from z0inf_pipeline.influence.checkpoints import read_checkpoint
from z0inf_pipeline.training.datasets import load_dataset


@pytest.fixture
def files(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir(T=5)
    gen = torch.Generator().manual_seed(0)
    train = LossTable(np.arange(10, 30), tuple(range(0, 50, 10)), torch.rand(5, 20, generator=gen))
    return folder, train, train.write(tmp_path / "train.parquet")


def cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_a_reused_gram_must_come_from_the_same_parameters_and_checkpoints(files, tmp_path, capsys, checkpoint_dir):
    folder, train, train_path = files
    head_gram, full_gram, out = tmp_path / "head.parquet", tmp_path / "full.parquet", tmp_path / "si.parquet"
    assert cli(capsys, "gram", folder, "-o", head_gram, "--parameters", "head.*")[0] == 0
    assert cli(capsys, "gram", folder, "-o", full_gram)[0] == 0

    code, err = cli(capsys, "self-influence", folder, train_path, "-o", out, "--gram", head_gram)
    assert code == 2 and not out.exists()
    assert f"gram file {head_gram}: was computed from parameters ['head.bias', 'head.weight'], not the selected" in err

    # the same selection is accepted, and gives the scores of the checkpoints themselves
    # (every checkpoint and explicit estimator settings, so the expected scores do not follow the defaults)
    estimator = dict(neighbors=2, neighbor_rule="order")
    code, err = cli(capsys, "self-influence", folder, train_path, "-o", out, "--gram", head_gram, "--parameters", "head.*",
                    "--warmup-fraction", "0", "--neighbors", "2", "--neighbor-rule", "order")
    assert code == 0, err
    expected = self_influence(gram_matrix(folder, parameters=["head.*"]), train.values, **estimator).numpy()
    np.testing.assert_allclose(pd.read_parquet(out)["self_influence"], expected, rtol=1e-6)

    # other checkpoints with the same steps (another run): refused, naming the steps that differ
    mine = folder.rename(tmp_path / "mine")
    other_folder, _ = checkpoint_dir(T=5, seed=1)  # the fixture writes a fresh folder where the first was
    code, err = cli(capsys, "self-influence", other_folder, train_path, "-o", out, "--gram", full_gram)
    assert code == 2 and "other checkpoint files at step(s) [0, 10, 20, 30, 40]" in err

    # no --no-center for a centred Gram either
    code, err = cli(capsys, "self-influence", mine, train_path, "-o", out, "--gram", full_gram, "--no-center")
    assert code == 2 and "center=True, not False" in err


def test_a_gram_without_provenance_asymmetric_or_with_a_negative_diagonal_is_refused(files, tmp_path, capsys):
    folder, _, train_path = files
    good = tmp_path / "g.parquet"
    assert cli(capsys, "gram", folder, "-o", good)[0] == 0
    frame = pd.read_parquet(good)
    out = tmp_path / "si.parquet"

    bare = tmp_path / "bare.parquet"
    frame.copy().pipe(lambda f: setattr(f, "attrs", {}) or f).to_parquet(bare)
    code, err = cli(capsys, "self-influence", folder, train_path, "-o", out, "--gram", bare)
    assert code == 2 and "records no provenance" in err

    asymmetric = frame.copy()
    asymmetric.attrs = frame.attrs
    asymmetric.loc[0, "step_10"] += 0.5 * abs(frame["step_0"].max()) + 1.0
    asymmetric.to_parquet(tmp_path / "asym.parquet")
    code, err = cli(capsys, "self-influence", folder, train_path, "-o", out, "--gram", tmp_path / "asym.parquet")
    assert code == 2 and "asym.parquet: not symmetric" in err

    negative = frame.copy()
    negative.attrs = frame.attrs
    negative.loc[2, "step_20"] = -1.0
    negative.to_parquet(tmp_path / "neg.parquet")
    code, err = cli(capsys, "self-influence", folder, train_path, "-o", out, "--gram", tmp_path / "neg.parquet")
    assert code == 2 and "neg.parquet: diagonal entry 2 is -1" in err
    assert not out.exists()


def raw_safetensors(path, tensors: dict, data_bytes: int):
    header = json.dumps({**tensors, "__metadata__": {"step": "0"}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(data_bytes))
    return path


@pytest.mark.parametrize(
    "tensors, data_bytes, message",
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
          "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24, r"tensor .b. \(bytes \[8, 24\]\) overlaps tensor .a."),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
          "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 16, "tensor .b. .* overlaps tensor .a."),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, 32, "tensor 'a' starts at byte 16"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}}, 16, r"tensor .a. has non-integer data offsets \[0.0, 16.0\]"),
        ({"a": {"dtype": "F32", "shape": [2.5, 2], "data_offsets": [0, 16]}}, 16, "tensor .a. has a malformed shape"),
    ],
)
def test_overlapping_gapped_or_float_offsets_are_refused(tmp_path, tensors, data_bytes, message):
    path = raw_safetensors(tmp_path / "odd.safetensors", tensors, data_bytes)
    with pytest.raises(InputError, match=f"odd.safetensors: {message}"):
        read_checkpoint(path)


def test_tensors_stored_out_of_name_order_are_fine(tmp_path):
    tensors = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
               "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    ckpt = read_checkpoint(raw_safetensors(tmp_path / "ok.safetensors", tensors, 32))
    assert ckpt.tensors["b"].offset < ckpt.tensors["a"].offset


def test_checkpoints_without_floating_point_tensors_are_refused(tmp_path, capsys):
    folder = tmp_path / "ints"
    for step in (0, 1, 2):
        save_checkpoint(folder / f"s{step}.safetensors", {"count": torch.arange(4) * step, "mask": torch.ones(3, dtype=torch.bool)}, step=step)
    code, err = cli(capsys, "gram", folder, "-o", tmp_path / "g.parquet")
    assert code == 2 and "s0.safetensors: holds no floating-point tensors (only ['BOOL', 'I64'])" in err
    assert not (tmp_path / "g.parquet").exists()


def test_scores_that_overflow_are_refused_by_name(files, tmp_path, capsys):
    folder, train, _ = files
    values = train.values.clone()
    values[2, 5] = 1e38  # finite in float32, but squared differences are not
    huge = LossTable(train.example_ids, train.steps, values).write(tmp_path / "huge.parquet")
    out = tmp_path / "si.parquet"
    code, err = cli(capsys, "self-influence", folder, huge, "-o", out)
    assert code == 2 and not out.exists()
    assert "scores are NaN or inf (first at example_id 15)" in err and "too large" in err


def test_a_feature_column_that_overflows_when_standardised_is_named(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"ok": rng.normal(size=40), "huge": np.where(np.arange(40) % 2, 1e308, -1e308),
                          "label": np.arange(40) % 2})
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError, match=r"t.csv: feature column\(s\) \['huge'\] are NaN or inf after standardisation"):
        load_dataset(str(tmp_path / "t.csv"))
