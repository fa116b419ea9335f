"""Contract v2: runs fed from DataLoaders whose data never sits in one tensor, checkpoints of selected
parameters, optional text columns, and bad batches refused with a named error and a FAILED run."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from z0inf_pipeline.errors import InputError
from z0inf_pipeline.influence import gram_matrix, read_loss_table
from z0inf_pipeline.tracking import CONTRACT_TAG, ContractError, ContractLogger, fetch_run, list_contract_runs
from z0inf_pipeline.training import layout

FACTORY = {"factory": "torch.nn:Identity", "kwargs": {}}  # never rebuilt here: logged tables are used


@pytest.fixture(autouse=True)
def trust_the_factory(monkeypatch):
    """Reading a run checks its factory against the allow-list: the team trusts the one it names."""
    monkeypatch.setenv("Z0INF_TRUSTED_FACTORIES", "torch.nn")


class FilesOnDisk(Dataset):
    """One ``.npy`` file per example, read when the item is asked for: nothing is held in memory."""

    def __init__(self, folder: Path, ids: np.ndarray, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.paths, self.ids = [], ids
        for i in ids:
            path = folder / f"{i}.npy"
            x = rng.normal(size=6).astype(np.float32)
            np.save(path, np.concatenate([x, [float(x[:3].sum() > 0)]]).astype(np.float32))
            self.paths.append(path)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        row = np.load(self.paths[index])
        return {"example_id": int(self.ids[index]), "x": torch.from_numpy(row[:6]), "y": int(row[6])}


def batch_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.fixture
def loaders(tmp_path):
    train = FilesOnDisk(tmp_path, np.arange(100, 160), seed=1)
    test = FilesOnDisk(tmp_path, np.arange(900, 920), seed=2)
    return DataLoader(train, batch_size=16), DataLoader(test, batch_size=7), train, test


def _train(run: ContractLogger, model: nn.Module, loader: DataLoader, steps: int = 6) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    run.on_checkpoint(model, 0, lr=0.5)
    step = 0
    while step < steps:
        for batch in loader:
            optimizer.zero_grad()
            batch_loss(model, batch).mean().backward()
            optimizer.step()
            step += 1
            if step % 2 == 0:
                run.on_checkpoint(model, step, lr=0.5)
            if step == steps:
                break


def test_a_dataloader_fed_run_matches_an_independent_evaluation(tracking_uri, loaders, tmp_path):
    train_loader, test_loader, train_set, test_set = loaders
    model = make_model()
    model[0].requires_grad_(False)  # fine-tuning only the head: checkpoints store only what trains
    text = pd.DataFrame({"example_id": np.arange(100, 160), "uri": [f"file://{p}" for p in train_set.paths]})
    with ContractLogger(model_spec=FACTORY, train=train_loader, test=test_loader, loss_fn=batch_loss,
                        examples=text, checkpoint_parameters="trainable", tracking_uri=tracking_uri,
                        experiment="v2", flipped_ids=[101, 150]) as run:
        _train(run, model, train_loader)
    fetched = fetch_run(run.run_id, tracking_uri=tracking_uri, cache_dir=tmp_path / "cache")
    assert fetched.tags[CONTRACT_TAG] == "2" and fetched.tags["z0inf.checkpoint_parameters"] == "trainable"
    assert fetched.tags["z0inf.loss"] == "batch_loss" and fetched.steps == [0, 2, 4, 6]
    assert fetched.params["n_train"] == "60" and fetched.params["n_test"] == "20"
    stored = [load_file(str(p)) for p in fetched.checkpoints]
    assert all(sorted(s) == ["2.bias", "2.weight"] for s in stored)

    # independent: rebuild each checkpoint's network item by item and evaluate every example alone
    final = make_model()
    for step, state in zip(fetched.steps, stored):
        final.load_state_dict(state, strict=False)
        for split, dataset in (("train", train_set), ("test", test_set)):
            table = read_loss_table(fetched.train_losses if split == "train" else fetched.test_losses)
            expected = []
            for index in range(len(dataset)):
                item = dataset[index]
                with torch.no_grad():
                    logits = final(item["x"][None]).double()[0]
                expected.append(float(torch.logsumexp(logits, 0) - logits[item["y"]]))
            np.testing.assert_array_equal(table.example_ids, dataset.ids)
            np.testing.assert_allclose(table.values[fetched.steps.index(step)].numpy(), expected, rtol=1e-5, atol=1e-6)
    # the Gram reads whatever is stored: here the head only
    weights = torch.stack([torch.cat([s["2.bias"], s["2.weight"].reshape(-1)]).double() for s in stored])
    centred = weights - weights[0]
    torch.testing.assert_close(gram_matrix(fetched.checkpoints), centred @ centred.T, rtol=1e-12, atol=1e-12)

    examples = pd.read_parquet(fetched.examples).set_index("example_id")
    assert (examples.loc[np.arange(100, 160), "label"] == layout.NO_LABEL).all()
    assert examples.loc[123, "uri"] == f"file://{train_set.paths[23]}" and pd.isna(examples.loc[900, "uri"])
    assert set(examples.index[examples.flipped]) == {101, 150}


def in_memory_run(tracking_uri: str) -> tuple[str, torch.Tensor]:
    """A two-checkpoint run logged from in-memory tensors (the v1-era form); returns its id and labels."""
    torch.manual_seed(0)
    x, y = torch.randn(30, 6), torch.randint(0, 2, (30,))
    model = make_model()
    with ContractLogger(model_spec=FACTORY, train=(np.arange(20), x[:20], y[:20]),
                        test=(np.arange(20, 30), x[20:], y[20:]), tracking_uri=tracking_uri) as run:
        run.on_checkpoint(model, 0)
        run.on_checkpoint(model, 1)
    return run.run_id, y


def test_the_in_memory_form_still_works_and_writes_v2(tracking_uri, tmp_path):
    run_id, y = in_memory_run(tracking_uri)
    fetched = fetch_run(run_id, tracking_uri=tracking_uri, cache_dir=tmp_path / "cache")
    assert fetched.tags[CONTRACT_TAG] == "2" and [r.run_id for r in list_contract_runs(tracking_uri=tracking_uri)] == [
        run_id]
    examples = pd.read_parquet(fetched.examples)
    np.testing.assert_array_equal(examples["label"].to_numpy()[:20], y[:20].numpy())


class Batches:
    """A re-iterable list of dict batches whose content a test can change between passes."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _batch(ids, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"example_id": torch.tensor(ids), "x": torch.randn(len(ids), 6, generator=g),
            "y": torch.randint(0, 2, (len(ids),), generator=g)}


def _wrong_shape(model, batch):
    return batch_loss(model, batch)[:, None]


def _nan_loss(model, batch):
    losses = batch_loss(model, batch)
    losses[1] = float("nan")
    return losses


def _changing_probe():
    probe = Batches([_batch([7, 8, 9])])

    def before_second(step):
        if step == 1:
            probe.batches = [_batch([8, 7, 9])]
    return probe, before_second


def _bad_cases():
    good = Batches([_batch([1, 2, 3]), _batch([4, 5])])
    no_ids = Batches([{k: v for k, v in _batch([1, 2]).items() if k != "example_id"}])
    repeated = Batches([_batch([1, 2, 3]), _batch([3, 4])])
    probe, change = _changing_probe()
    return {
        "wrong shape": (dict(train=good, test=Batches([_batch([7])]), loss_fn=_wrong_shape), None,
                        "must return one value per example"),
        "NaN loss": (dict(train=good, test=Batches([_batch([7, 8])]), loss_fn=_nan_loss), None,
                     "NaN/inf loss(es) in batch 0 at step 0 (first at example_id 2)"),
        "batch without ids": (dict(train=no_ids, test=Batches([_batch([7])]), loss_fn=batch_loss), None,
                              "carries no example ids (KeyError"),
        "ids repeated across batches": (dict(train=repeated, test=Batches([_batch([7])]), loss_fn=batch_loss), None,
                                        "appear more than once across batches, e.g. [3]"),
        "probe set changes": (dict(train=good, test=probe, loss_fn=batch_loss), change,
                              "test: batch 0 at step 1 holds ids [8, 7, 9]"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_batches_fail_the_run_with_a_named_error_and_leave_nothing(case, tracking_uri, tmp_path):
    kwargs, before_step, message = _bad_cases()[case]
    model = make_model()
    logger = ContractLogger(model_spec=FACTORY, tracking_uri=tracking_uri, experiment="bad", **kwargs)
    with pytest.raises(InputError, match=re.escape(message)):
        with logger as run:
            for step in range(2):
                if before_step:
                    before_step(step)
                run.on_checkpoint(model, step)
    client = MlflowClient(tracking_uri)
    assert client.get_run(logger.run_id).info.status == "FAILED"
    assert client.list_artifacts(logger.run_id) == []
    assert list_contract_runs(tracking_uri=tracking_uri) == []
    with pytest.raises(ContractError, match="status is FAILED"):
        fetch_run(logger.run_id, tracking_uri=tracking_uri, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


def test_one_shot_iterators_and_mixed_forms_are_refused():
    with pytest.raises(InputError, match="one-shot iterator"):
        ContractLogger(model_spec=FACTORY, train=iter([_batch([1])]), test=[_batch([2])], loss_fn=batch_loss)
    with pytest.raises(ContractError, match="both be in-memory"):
        ContractLogger(model_spec=FACTORY, train=(np.arange(2), torch.zeros(2, 6), torch.zeros(2).long()),
                       test=[_batch([2])])


def test_a_teams_job_reads_the_published_curation(tracking_uri, tmp_path):
    from z0inf_pipeline.review import curate
    from z0inf_pipeline.tracking import curation_of
    from z0inf_pipeline.tracking.curation import CURATED_ARTIFACT

    run_id, y = in_memory_run(tracking_uri)
    with pytest.raises(ContractError, match="curated_training_set.parquet' is missing"):
        curation_of(run_id, tracking_uri=tracking_uri, cache_dir=tmp_path / "cache")
    # what the curated_training_set asset publishes: the curation of the decisions, logged back to the run
    train = pd.DataFrame({"example_id": np.arange(20), "label": y[:20].numpy()})
    decisions = pd.DataFrame({"example_id": [3, 11, 5], "action": ["drop", "drop", "relabel"],
                              "label": [None, None, 1 - int(y[5])]})
    path = tmp_path / "curated_training_set.parquet"
    curate(train, decisions, num_classes=2).frame.to_parquet(path)
    MlflowClient(tracking_uri).log_artifact(run_id, str(path), str(Path(CURATED_ARTIFACT).parent))
    curation = curation_of(run_id, tracking_uri=tracking_uri, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(curation.drop_ids, [3, 11])
    np.testing.assert_array_equal(curation.keep_ids, [i for i in range(20) if i not in (3, 11)])
    assert curation.relabels == {5: 1 - int(y[5])}
