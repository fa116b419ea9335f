"""The training loop: checkpoint schedule, metadata, loss tables recomputed independently, determinism."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from z0inf_pipeline.errors import InputError
from z0inf_pipeline.influence import read_loss_table
from z0inf_pipeline.training import ModelSpec, TrainConfig, build_model, checkpoint_steps, load_dataset, train
from z0inf_pipeline.training import layout

SMALL = TrainConfig(epochs=3, checkpoints=5, hidden=(16,), batch_size=128)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return train(SMALL, tmp_path_factory.mktemp("run") / "out")


def test_checkpoint_steps_spread_evenly_including_first_and_last():
    assert checkpoint_steps(660, count=20)[:2] == [0, 35] and checkpoint_steps(660, count=20)[-1] == 660
    for total, count in [(10, 11), (7, 4), (100, 2), (3, 3), (5, 4)]:
        steps = checkpoint_steps(total, count=count)
        assert len(steps) == count == len(set(steps)) and steps[0] == 0 and steps[-1] == total
        assert steps == sorted(steps)
    assert checkpoint_steps(10, every=2, unit_steps=3) == [0, 6, 10]
    assert checkpoint_steps(12, every=1, unit_steps=4) == [0, 4, 8, 12]
    with pytest.raises(InputError, match="only 5 steps"):
        checkpoint_steps(5, count=7)


def test_run_folder_layout_and_checkpoint_metadata(small_run):
    out = small_run.checkpoints[0].parents[1]
    bundle = small_run.bundle
    steps_per_epoch = math.ceil(len(bundle.train) / SMALL.batch_size)
    total = SMALL.epochs * steps_per_epoch
    expected_steps = checkpoint_steps(total, count=SMALL.checkpoints)
    assert [row["step"] for row in small_run.metrics] == expected_steps
    assert [p.relative_to(out).as_posix() for p in small_run.checkpoints] == [
        f"checkpoints/step_{s:08d}.safetensors" for s in expected_steps
    ]
    for path, step in zip(small_run.checkpoints, expected_steps):
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        used = max(step - 1, 0)  # the lr of the update that produced this checkpoint
        lr = SMALL.lr * 0.5 * (1 + math.cos(math.pi * used / total))
        assert int(meta["step"]) == step
        assert float(meta["epoch"]) == pytest.approx(step / steps_per_epoch)
        assert float(meta["learning_rate"]) == pytest.approx(lr, rel=1e-9)
    manifest = json.loads((out / layout.MANIFEST).read_text())
    listed = {e["path"]: e for e in manifest["files"]}
    assert set(listed) == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {layout.MANIFEST}
    assert all(listed[p]["bytes"] == (out / p).stat().st_size for p in listed)
    assert json.loads((out / layout.MODEL_SPEC).read_text()) == small_run.model_spec.to_dict()
    assert TrainConfig.from_dict(json.loads((out / layout.TRAIN_CONFIG).read_text())) == SMALL


def test_step_zero_checkpoint_is_the_untrained_model(small_run):
    torch.manual_seed(SMALL.seed)
    initial = build_model(small_run.model_spec).state_dict()
    saved = load_file(str(small_run.checkpoints[0]))
    assert all(torch.equal(initial[k], saved[k]) for k in initial)
    final = load_file(str(small_run.checkpoints[-1]))
    assert all(torch.equal(small_run.model.state_dict()[k], final[k]) for k in final)


def _independent_losses(spec: ModelSpec, checkpoint, features, labels):
    """Cross-entropy by hand (log-softmax gathered at the label), from weights loaded with safetensors."""
    model = build_model(spec)
    model.load_state_dict(load_file(str(checkpoint)))
    with torch.no_grad():
        logits = model.eval()(features).double()
    log_probs = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -log_probs[torch.arange(len(labels)), labels], logits.argmax(dim=1) == labels


def test_loss_tables_and_metrics_match_an_independent_recomputation(small_run):
    bundle = load_dataset("digits", seed=SMALL.seed)  # loaded afresh, not the run's tensors
    for split_name, path, split in (("train", small_run.train_losses, bundle.train),
                                    ("test", small_run.test_losses, bundle.test)):
        table = read_loss_table(path, expected_steps=[m["step"] for m in small_run.metrics])
        assert np.array_equal(table.example_ids, split.example_ids)
        for t, (row, ckpt) in enumerate(zip(small_run.metrics, small_run.checkpoints)):
            losses, hits = _independent_losses(small_run.model_spec, ckpt, split.features, split.labels)
            np.testing.assert_allclose(table.values[t].numpy(), losses.numpy(), rtol=1e-4, atol=1e-5)
            assert row[f"{split_name}_loss"] == pytest.approx(float(losses.mean()), rel=1e-4)
            assert row[f"{split_name}_accuracy"] == pytest.approx(float(hits.double().mean()), abs=1e-6)
    assert small_run.metrics[-1]["train_loss"] < small_run.metrics[0]["train_loss"] / 3


def test_training_is_deterministic_and_loss_recording_does_not_change_it(small_run, tmp_path):
    again = train(SMALL, tmp_path / "again", record_losses=False)
    assert again.train_losses is None and again.test_losses is None
    assert set(again.metrics[0]) == {"step", "epoch", "lr"}
    for a, b in zip(small_run.checkpoints, again.checkpoints):
        sa, sb = load_file(str(a)), load_file(str(b))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    other = train(TrainConfig(**{**SMALL.to_dict(), "seed": 1}), tmp_path / "other", record_losses=False)
    assert not torch.equal(load_file(str(other.checkpoints[-1]))["1.weight"],
                           load_file(str(again.checkpoints[-1]))["1.weight"])


def test_examples_table_and_curation(tmp_path):
    base = load_dataset("digits", label_noise=None)
    drop, relabel_id = base.train.example_ids[:5], int(base.train.example_ids[10])
    config = TrainConfig(epochs=1, checkpoints=2, hidden=(8,), label_noise=0.1, noise_seed=3,
                         exclude_ids=tuple(drop), relabels=((relabel_id, 4),))
    result = train(config, tmp_path / "run")
    examples = pd.read_parquet(result.examples)
    train_rows = examples[examples.split == "train"].set_index("example_id")
    assert not train_rows.index.isin(drop).any() and len(train_rows) == len(base.train) - 5
    assert train_rows.loc[relabel_id, "label"] == 4
    clean = pd.Series(base.train.labels.numpy(), index=base.train.example_ids)
    assert (train_rows["original_label"] == clean.loc[train_rows.index]).all()
    flipped = train_rows.index[train_rows["flipped"]]
    assert set(flipped) == set(result.bundle.flipped_ids)
    assert ((train_rows.loc[flipped, "label"] != train_rows.loc[flipped, "original_label"])
            | (flipped == relabel_id)).all()
    assert set(examples[examples.split == "test"].example_id) == set(base.test.example_ids)
    assert np.array_equal(read_loss_table(result.train_losses).example_ids, train_rows.index.to_numpy())
    subset_config = TrainConfig(epochs=1, checkpoints=2, hidden=(8,), train_subset=tuple(base.train.example_ids[::3]))
    subset_run = train(subset_config, tmp_path / "subset")
    assert np.array_equal(subset_run.bundle.train.example_ids, base.train.example_ids[::3])


def test_failed_training_leaves_the_previous_folder_untouched(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(epochs=1, checkpoints=2, hidden=(8,)), out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def explode(row):
        if row["step"] > 0:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        train(TrainConfig(epochs=2, checkpoints=3, hidden=(8,)), out, on_checkpoint=explode)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    train(TrainConfig(epochs=2, checkpoints=3, hidden=(8,)), out)  # a rerun replaces the folder whole
    assert len(list((out / "checkpoints").iterdir())) == 3


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(model="cnn", epochs=2, checkpoints=3, hidden=(16,)),
        TrainConfig(model="logreg", dataset="breast_cancer", epochs=5, checkpoints=3, optimizer="adamw",
                    lr=0.01, schedule="linear"),
        TrainConfig(epochs=4, checkpoint_every=2, checkpoint_unit="epoch", schedule="constant", hidden=(32, 16)),
    ],
)
def test_every_model_optimizer_and_schedule_learns(config, tmp_path):
    result = train(config, tmp_path / "run")
    assert result.metrics[-1]["test_accuracy"] > 0.85
    assert result.metrics[-1]["train_loss"] < result.metrics[0]["train_loss"]
    if config.checkpoint_every:
        per_epoch = math.ceil(len(result.bundle.train) / config.batch_size)
        assert [m["step"] for m in result.metrics] == [0, 2 * per_epoch, 4 * per_epoch]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"optimizer": "rmsprop"}, "optimizer='rmsprop'"),
        ({"checkpoints": 1}, "checkpoints=1"),
        ({"label_noise": 1.0}, "label_noise=1.0"),
        ({"model": "transformer"}, "model='transformer'"),
    ],
)
def test_bad_configs_are_rejected(changes, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(**changes)
    with pytest.raises(InputError, match="unknown field"):
        TrainConfig.from_dict({"epoch": 3})


def test_fine_tuning_pretrains_on_a_clean_part_and_checkpoints_only_the_rest(tmp_path):
    from z0inf_pipeline.training import load_dataset
    from z0inf_pipeline.training.trainer import pretraining_data, training_data

    config = TrainConfig(dataset="wine", epochs=3, checkpoints=4, label_noise=0.2, pretrain_fraction=0.4,
                         pretrain_epochs=5)
    full = load_dataset("wine", label_noise=config.noise)
    pre, fine = pretraining_data(config), training_data(config)
    assert len(pre) == round(0.4 * len(full.train))
    assert set(pre.example_ids).isdisjoint(fine.train.example_ids)
    assert set(pre.example_ids) | set(fine.train.example_ids) == set(full.train.example_ids)
    clean = dict(zip(full.train.example_ids.tolist(), full.clean_train_labels.tolist()))
    assert pre.labels.tolist() == [clean[i] for i in pre.example_ids.tolist()]  # pretraining sees no flips
    assert set(fine.flipped_ids) <= set(fine.train.example_ids)
    run = train(config, tmp_path / "fine")
    scratch = train(TrainConfig(**{**config.to_dict(), "pretrain_fraction": 0.0, "pretrain_epochs": 0}),
                    tmp_path / "scratch")
    # step 0 of the fine-tuning run is the pretrained model, not the initialisation
    assert run.metrics[0]["train_accuracy"] > scratch.metrics[0]["train_accuracy"] + 0.2
    assert [r["step"] for r in run.metrics][-1] == 3 * math.ceil(len(fine.train) / config.batch_size)


@pytest.mark.parametrize("row_group_rows", [3, 7, 1000])
def test_the_examples_table_written_in_row_groups_is_the_whole_table(tmp_path, monkeypatch, row_group_rows):
    """Row groups that end inside the train ids, on their boundary or past the test ids: the same rows as
    the table built whole with pandas."""
    monkeypatch.setattr(layout, "ROW_GROUP_ROWS", row_group_rows)
    rng = np.random.default_rng(5)
    train_ids, test_ids = rng.permutation(np.arange(100, 121)), np.array([7, 3, 9, 1])
    train_labels, test_labels = rng.integers(0, 3, 21), rng.integers(0, 3, 4)
    clean = rng.integers(0, 3, 21)
    flipped = train_ids[[2, 5, 20]]
    prompts = [f"p{i}" for i in range(25)]
    layout.write_examples(tmp_path / "e.parquet", train_ids=train_ids, train_labels=train_labels,
                          original_train_labels=clean, flipped_ids=flipped, test_ids=test_ids,
                          test_labels=test_labels, text={"prompt": prompts})
    expected = pd.DataFrame({
        "example_id": [*train_ids, *test_ids], "split": ["train"] * 21 + ["test"] * 4,
        "label": [*train_labels, *test_labels], "original_label": [*clean, *test_labels],
        "flipped": [i in set(flipped) for i in train_ids] + [False] * 4, "prompt": prompts,
    })
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "e.parquet"), expected, check_dtype=False)
