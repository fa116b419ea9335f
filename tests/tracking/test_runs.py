"""Contract runs end to end against real stores: a SQLite file and a real ``mlflow server`` subprocess.

Broken runs are made the way a faulty producer would make them: a real run is logged through the
MLflow client from a run folder that was altered first (a file removed, a checkpoint cut short, an
extra artifact whose name holds ``..``, a manifest naming a path outside the folder). MLflow itself
refuses a path *component* ``..`` on upload and download, but a name such as ``..step_99`` is stored
and listed as it is, and the manifest is data from the run: the reader must refuse both on its own.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from safetensors.torch import load_file
from torch import nn

from z0inf_pipeline.influence import read_loss_table
from z0inf_pipeline.influence.analysis import InfluenceAnalysis
from z0inf_pipeline.training import (
    LabelNoise,
    ModelSpec,
    TrainConfig,
    build_model,
    checkpoint_steps,
    layout,
    load_dataset,
    train,
)
from z0inf_pipeline.tracking import (
    CONTRACT_TAG,
    CONTRACT_VERSION,
    ContractError,
    ContractLogger,
    fetch_run,
    list_contract_runs,
    train_and_log,
    validate_run,
)
from z0inf_pipeline.tracking.client import ensure_experiment

UNREACHABLE = "http://127.0.0.1:9"  # nothing listens on the discard port: any request would fail


@pytest.fixture(scope="module", params=["sqlite", pytest.param("server", marks=pytest.mark.mlflow_server)])
def store(request, tmp_path_factory) -> str:
    if request.param == "server":
        return request.getfixturevalue("mlflow_server")
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite-store') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def digits_run(store) -> str:
    """The default digits MLP (30 epochs, T = 20) on clean labels, logged by train_and_log."""
    return train_and_log(TrainConfig(), tracking_uri=store, experiment="digits-default")


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    result = train(TrainConfig(epochs=2, checkpoints=4, hidden=(8,)), tmp_path_factory.mktemp("small") / "run")
    return result.checkpoints[0].parents[1], result


def _artifact_files(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    files = set()
    for info in client.list_artifacts(run_id, path):
        files |= _artifact_files(client, run_id, info.path) if info.is_dir else {info.path}
    return files


def _hand_losses(model_spec: dict, checkpoint: Path, split):
    model = build_model(ModelSpec.from_dict(model_spec))
    model.load_state_dict(load_file(str(checkpoint)))
    with torch.no_grad():
        logits = model.eval()(split.features).double()
    picked = logits[torch.arange(len(split.labels)), split.labels]
    return torch.logsumexp(logits, dim=1) - picked, (logits.argmax(dim=1) == split.labels).double().mean().item()


def test_training_run_logs_the_whole_contract(store, digits_run, tmp_path):
    client = MlflowClient(store)
    run = client.get_run(digits_run)
    assert run.info.status == "FINISHED"
    assert run.data.tags[CONTRACT_TAG] == CONTRACT_VERSION and run.data.tags["z0inf.num_checkpoints"] == "20"
    assert run.data.tags["z0inf.dataset"] == "digits"
    params = run.data.params
    assert {k: params[k] for k in ("model", "epochs", "checkpoints", "optimizer", "n_train", "n_test")} == {
        "model": "mlp", "epochs": "30", "checkpoints": "20", "optimizer": "sgd", "n_train": "1347", "n_test": "450"}

    steps = checkpoint_steps(30 * 22, count=20)  # 1347 examples / batch 64 -> 22 steps per epoch
    assert _artifact_files(client, digits_run) == {
        layout.checkpoint_name(s) for s in steps
    } | {layout.TRAIN_LOSSES, layout.TEST_LOSSES, layout.EXAMPLES, layout.MODEL_SPEC, layout.TRAIN_CONFIG,
         layout.MANIFEST}
    for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "lr", "epoch"):
        assert sorted(m.step for m in client.get_metric_history(digits_run, key)) == steps, key
    logged_accuracy = run.data.metrics["test_accuracy"]
    assert logged_accuracy >= 0.95  # acceptance: digits MLP on clean labels

    cached = fetch_run(digits_run, tracking_uri=store, cache_dir=tmp_path / "cache")
    assert cached.cache_dir == tmp_path / "cache" / digits_run and cached.steps == steps
    assert [p.name for p in cached.checkpoints] == [Path(layout.checkpoint_name(s)).name for s in steps]
    assert TrainConfig.from_dict(cached.train_config) == TrainConfig()
    # independent check of what was logged: rebuild the final network from the downloaded checkpoint
    test = load_dataset("digits").test
    losses, accuracy = _hand_losses(cached.model_spec, cached.checkpoints[-1], test)
    assert accuracy == pytest.approx(logged_accuracy, abs=1e-6) and accuracy >= 0.95
    table = read_loss_table(cached.test_losses, expected_steps=steps)
    np.testing.assert_allclose(table.values[-1].numpy(), losses.numpy(), rtol=1e-4, atol=1e-5)
    model = cached.load_model()
    with torch.no_grad():
        assert (model(test.features).argmax(1) == test.labels).double().mean().item() == pytest.approx(accuracy)

    again = fetch_run(digits_run, tracking_uri=UNREACHABLE, cache_dir=tmp_path / "cache")  # served from the cache
    assert again.checkpoints == cached.checkpoints and again.params == cached.params


def test_a_damaged_cache_entry_is_downloaded_again_and_replaced(store, digits_run, tmp_path):
    cache = tmp_path / "cache"
    first = fetch_run(digits_run, tracking_uri=store, cache_dir=cache)
    checkpoint = first.checkpoints[3]
    size = checkpoint.stat().st_size
    _truncate(checkpoint)
    again = fetch_run(digits_run, tracking_uri=store, cache_dir=cache)
    assert again.checkpoints[3] == checkpoint and checkpoint.stat().st_size == size
    assert sorted(p.name for p in cache.iterdir()) == [digits_run]  # no partial or stale folder left


def test_label_noise_run_records_the_flipped_ids(store, tmp_path):
    config = TrainConfig(epochs=2, checkpoints=3, hidden=(8,), label_noise=0.1, noise_seed=4)
    run_id = train_and_log(config, tracking_uri=store, experiment="noise", tags={"purpose": "test"})
    run = fetch_run(run_id, tracking_uri=store, cache_dir=tmp_path / "cache")
    examples = pd.read_parquet(run.examples)
    expected = load_dataset("digits", label_noise=LabelNoise(0.1, seed=4)).flipped_ids
    assert set(examples.loc[examples.flipped, "example_id"]) == set(expected) and len(expected) == 135
    assert run.params["n_flipped"] == "135" and run.tags["purpose"] == "test"


def _log_folder_as_run(client: MlflowClient, experiment: str, folder: Path, metrics: list[dict],
                       version: str = CONTRACT_VERSION) -> str:
    """What a producer does: contract tags, params, one metrics row per checkpoint, the folder as artifacts."""
    run_id = client.create_run(ensure_experiment(client, experiment), tags={CONTRACT_TAG: version}).info.run_id
    examples = pd.read_parquet(folder / layout.EXAMPLES)
    client.log_batch(run_id, params=[Param("n_train", str((examples.split == "train").sum())),
                                      Param("n_test", str((examples.split == "test").sum()))])
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, row["step"]) for row in metrics for k, v in row.items()
                                      if k != "step"])
    client.log_artifacts(run_id, str(folder))
    client.set_tag(run_id, "z0inf.num_checkpoints", str(len(metrics)))
    client.set_terminated(run_id, "FINISHED")
    return run_id




def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DEFECTS = {
    # name: (how to damage the folder, rewrite the manifest afterwards?, what the error must say)
    "missing_loss_table": (lambda f: (f / layout.TEST_LOSSES).unlink(), True,
                           r"\['loss_tables/test.parquet'\] are missing"),
    "loss_table_lost_after_manifest": (lambda f: (f / layout.TEST_LOSSES).unlink(), False,
                                       r"\['loss_tables/test.parquet'\] are listed in the manifest but missing"),
    "truncated_checkpoint": (lambda f: _truncate(f / layout.checkpoint_name(0)), True,
                             r"checkpoints/step_00000000.safetensors.*truncated"),
    "checkpoint_truncated_after_manifest": (lambda f: _truncate(f / layout.checkpoint_name(0)), False,
                                            r"checkpoints/step_00000000.safetensors.*(truncated or altered)"),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_broken_runs_are_rejected_and_leave_nothing_in_the_cache(store, small_folder, defect, tmp_path):
    source, result = small_folder
    folder = tmp_path / "folder"
    shutil.copytree(source, folder)
    damage, rewrite_manifest, message = DEFECTS[defect]
    damage(folder)
    if rewrite_manifest:
        layout.write_manifest(folder)
    client = MlflowClient(store)
    run_id = _log_folder_as_run(client, "broken", folder, result.metrics)
    cache = tmp_path / "cache"
    with pytest.raises(ContractError, match=message) as info:
        fetch_run(run_id, tracking_uri=store, cache_dir=cache)
    assert run_id in str(info.value)
    assert list(cache.iterdir()) == []
    with pytest.raises(ContractError, match=message):
        validate_run(run_id, tracking_uri=store)


def test_a_manifest_naming_a_path_outside_the_cache_is_refused(store, small_folder, tmp_path):
    source, result = small_folder
    folder = tmp_path / "folder"
    shutil.copytree(source, folder)
    manifest = json.loads((folder / layout.MANIFEST).read_text())
    manifest["files"].append({"path": "../../escaped.json", "bytes": 2, "sha256": "0" * 64})
    (folder / layout.MANIFEST).write_text(json.dumps(manifest))
    run_id = _log_folder_as_run(MlflowClient(store), "broken", folder, result.metrics)
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(ContractError, match=r"artifact '../../escaped.json' has an unsafe name"):
        fetch_run(run_id, tracking_uri=store, cache_dir=cache)
    assert list(cache.iterdir()) == []
    assert not any(p.name == "escaped.json" for p in tmp_path.rglob("*"))


def test_contract_violations_outside_the_files(store, small_folder, tmp_path):
    source, result = small_folder
    client = MlflowClient(store)
    cache = tmp_path / "cache"
    no_test_loss = [{k: v for k, v in row.items() if k != "test_loss"} for row in result.metrics]
    run_id = _log_folder_as_run(client, "broken", source, no_test_loss)
    with pytest.raises(ContractError, match=r"metric 'test_loss' is missing at checkpoint step\(s\) \[0, "):
        fetch_run(run_id, tracking_uri=store, cache_dir=cache)
    wrong_mean = [{**row, "train_loss": row["train_loss"] + 0.5} for row in result.metrics]
    run_id = _log_folder_as_run(client, "broken", source, wrong_mean)
    with pytest.raises(ContractError, match="metric 'train_loss' at step 0 is .* but the mean of"):
        fetch_run(run_id, tracking_uri=store, cache_dir=cache)
    run_id = _log_folder_as_run(client, "broken", source, result.metrics)
    client.set_tag(run_id, CONTRACT_TAG, "0")
    with pytest.raises(ContractError, match="tag 'z0inf.contract' is '0'"):
        fetch_run(run_id, tracking_uri=store, cache_dir=cache)
    with pytest.raises(ContractError, match="not found"):
        fetch_run(uuid.uuid4().hex, tracking_uri=store, cache_dir=cache)
    with pytest.raises(ContractError, match="not a valid MLflow run id"):
        fetch_run("../../etc", tracking_uri=store, cache_dir=cache)
    assert list(cache.iterdir()) == []


# -- a team's own loop, as in the README --------------------------------------------------------------

class TeamNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(30, width), nn.Tanh(), nn.Linear(width, 2))

    def forward(self, x):
        return self.body(x)


def zero_one_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(dim=1) != targets).float()


def test_contract_logger_turns_a_team_loop_into_a_contract_run(store, tmp_path, monkeypatch):
    monkeypatch.setenv("Z0INF_TRUSTED_FACTORIES", "tests.tracking")  # the team trusts its own package
    data = load_dataset("breast_cancer", seed=1)
    torch.manual_seed(0)
    model = TeamNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    total, per_epoch = 60, 6
    wanted = set(checkpoint_steps(total, count=6))
    spec = {"factory": f"{__name__}:TeamNet", "kwargs": {"width": 32}}
    with ContractLogger(model_spec=spec, train=data.train, test=data.test, loss_fn=zero_one_loss,
                        tracking_uri=store, experiment="team", params={"lr": 0.01}, dataset="breast_cancer") as run:
        run.on_checkpoint(model, 0, epoch=0, lr=0.01)
        batches = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0)).chunk(per_epoch)
        for step in range(1, total + 1):
            batch = batches[(step - 1) % per_epoch]
            optimizer.zero_grad()
            F.cross_entropy(model(data.train.features[batch]), data.train.labels[batch]).backward()
            optimizer.step()
            if step in wanted:
                run.on_checkpoint(model, step, epoch=step / per_epoch, lr=0.01)

    fetched = fetch_run(run.run_id, tracking_uri=store, cache_dir=tmp_path / "cache")
    assert fetched.steps == sorted(wanted) and fetched.params["lr"] == "0.01"
    assert fetched.tags["z0inf.source"] == "ContractLogger"
    table = read_loss_table(fetched.train_losses)
    for t, step in enumerate(fetched.steps):
        rebuilt = fetched.load_model(step)  # through the factory spec
        assert isinstance(rebuilt, TeamNet)
        with torch.no_grad():
            errors = (rebuilt(data.train.features).argmax(1) != data.train.labels).float()
        assert torch.equal(table.values[t], errors)
    assert table.values[-1].mean() < 0.1 < table.values[0].mean()


def test_a_failing_loop_marks_the_run_failed_and_uploads_nothing(store, tmp_path):
    data = load_dataset("breast_cancer")
    model = build_model(ModelSpec("logreg", (30,), 2))
    with pytest.raises(RuntimeError, match="out of memory"):
        with ContractLogger(model_spec=ModelSpec("logreg", (30,), 2), train=data.train, test=data.test,
                            tracking_uri=store, experiment="team-failed") as run:
            run.on_checkpoint(model, 0)
            raise RuntimeError("out of memory")
    client = MlflowClient(store)
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert _artifact_files(client, run.run_id) == set()
    with pytest.raises(ContractError, match="status is FAILED"):
        fetch_run(run.run_id, tracking_uri=store, cache_dir=tmp_path / "cache")


def test_list_contract_runs(store, small_folder):
    source, result = small_folder
    client = MlflowClient(store)
    experiment = f"listing-{uuid.uuid4().hex[:8]}"
    first = _log_folder_as_run(client, experiment, source, result.metrics)
    second = _log_folder_as_run(client, experiment, source, result.metrics)
    running = client.create_run(ensure_experiment(client, experiment), tags={CONTRACT_TAG: CONTRACT_VERSION})
    client.create_run(ensure_experiment(client, experiment))  # not a contract run
    listed = list_contract_runs(tracking_uri=store, experiment_names=[experiment])
    assert [r.run_id for r in listed] == [first, second]
    assert listed[0].start_time <= listed[1].start_time and listed[0].status == "FINISHED"
    everything = list_contract_runs(tracking_uri=store, status=None, experiment_names=[experiment, "no-such-exp"])
    assert [r.run_id for r in everything] == [first, second, running.info.run_id]
    assert {first, second} <= {r.run_id for r in list_contract_runs(tracking_uri=store)}


def test_a_contract_v1_run_is_still_listed_read_and_analysed(store, small_folder, tmp_path):
    """A v1 producer's run (tag "1"; its layout is v2 without the optional parts) keeps working."""
    folder, result = small_folder
    run_id = _log_folder_as_run(MlflowClient(store), "v1", folder, result.metrics, version="1")
    assert run_id in [r.run_id for r in list_contract_runs(tracking_uri=store, experiment_names=["v1"])]
    fetched = fetch_run(run_id, tracking_uri=store, cache_dir=tmp_path / "cache")
    assert fetched.tags[CONTRACT_TAG] == "1" and fetched.steps == [m["step"] for m in result.metrics]
    analysed = InfluenceAnalysis(fetched.checkpoints, fetched.train_losses, fetched.test_losses)
    local = InfluenceAnalysis(result.checkpoints, result.train_losses, result.test_losses)
    pd.testing.assert_frame_equal(analysed.self_influence_frame(), local.self_influence_frame())
    pd.testing.assert_frame_equal(analysed.topk_frame(), local.topk_frame())
    assert analysed.self_influence_frame()["self_influence"].gt(0).all()


def test_runs_of_an_unknown_contract_version_are_not_listed_and_refused(store, small_folder, tmp_path):
    folder, result = small_folder
    run_id = _log_folder_as_run(MlflowClient(store), "v9", folder, result.metrics, version="9")
    assert list_contract_runs(tracking_uri=store, experiment_names=["v9"]) == []
    with pytest.raises(ContractError, match="'z0inf.contract' is '9'; this reader understands versions"):
        fetch_run(run_id, tracking_uri=store, cache_dir=tmp_path / "cache")
