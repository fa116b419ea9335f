"""The Hugging Face callback with a real ``transformers.Trainer`` on a tiny random GPT-2 (nothing downloaded)."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, default_data_collator  # noqa: E402

from z0inf_pipeline.errors import InputError  # noqa: E402
from z0inf_pipeline.influence import read_loss_table  # noqa: E402
from z0inf_pipeline.integrations.hf import Z0InfCallback, id_batches, token_mean_nll  # noqa: E402
from z0inf_pipeline.tracking import fetch_run, list_contract_runs  # noqa: E402
from z0inf_pipeline.training.lm import IGNORE_INDEX, VOCAB, LMRecipe, SequenceDataset, task_examples  # noqa: E402

STEPS = [0, 2, 4, 6]


@pytest.fixture(autouse=True)
def no_active_run():
    yield
    while mlflow.active_run():
        mlflow.end_run()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(VOCAB), n_positions=16,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.transformer.h[0].requires_grad_(False)  # a partial fine-tune: checkpoints keep what trains
    return model


def data():
    train, probe = task_examples(LMRecipe(n_train=40, n_probe=12, string_length=4, corrupt_fraction=0.25))
    return train, probe, SequenceDataset(train, 11), SequenceDataset(probe, 11)


def run_trainer(tmp_path, report_to, loss_fn=token_mean_nll):
    train, probe, train_set, probe_set = data()
    callback = Z0InfCallback(
        train_batches=id_batches(train_set, default_data_collator, 16),
        probe_batches=id_batches(probe_set, default_data_collator, 5),
        loss_fn=loss_fn, steps=STEPS, experiment="hf-contract",
        examples=pd.concat([train, probe])[["example_id", "prompt", "target"]],
        flipped_ids=train.loc[train.corrupted, "example_id"].to_numpy(),
    )
    model = tiny_gpt2()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=report_to, save_strategy="no", logging_steps=2,
                             disable_tqdm=True, use_cpu=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=default_data_collator,
                      callbacks=[callback])
    with callback:
        trainer.train()
    return callback, model, train_set, probe_set


def hand_nll(model, dataset) -> np.ndarray:
    """Token-mean NLL example by example, token by token, from log-softmax: independent of the batched code."""
    out = []
    with torch.no_grad():
        for index in range(len(dataset)):
            item = dataset[index]
            logp = torch.log_softmax(model(input_ids=item["input_ids"][None]).logits[0].double(), dim=-1)
            terms = [-logp[t - 1, label] for t, label in enumerate(item["labels"].tolist())
                     if label != IGNORE_INDEX]
            out.append(float(sum(terms) / len(terms)))
    return np.array(out)


def test_a_trainer_with_mlflow_reporting_logs_one_contract_run(tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf-contract")
    callback, model, train_set, probe_set = run_trainer(tmp_path, ["mlflow"])
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("hf-contract").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"] and mlflow.active_run() is None
    contract = [r.run_id for r in list_contract_runs(tracking_uri=tracking_uri)]
    assert contract == [callback.run_id]
    framework = next(r for r in runs if r.info.run_id != callback.run_id)
    assert framework.data.tags["z0inf.contract_run_id"] == callback.run_id
    assert "train_loss" in framework.data.metrics  # transformers' own reporting is untouched
    store = tracking_uri.removeprefix("sqlite:///").rsplit("/", 1)[0]  # artifacts beside the store, not ./mlruns
    assert client.get_run(callback.run_id).info.artifact_uri.removeprefix("file://").startswith(store)

    fetched = fetch_run(callback.run_id, tracking_uri=tracking_uri, cache_dir=tmp_path / "cache")
    assert fetched.steps == STEPS and fetched.tags["mlflow.parentRunId"] == framework.info.run_id
    assert fetched.tags["z0inf.checkpoint_parameters"] == "trainable" and fetched.tags["z0inf.loss"] == "token_mean_nll"
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    architecture = fetched.build_model()  # from the model spec: the config, never a download
    assert type(architecture) is GPT2LMHeadModel and architecture.config.n_embd == 32
    assert sorted(architecture.state_dict()) == sorted(model.state_dict())
    rebuilt = tiny_gpt2().eval()  # same seed: the frozen block and the init are the same; no dropout
    for step, path in zip(STEPS, fetched.checkpoints):
        state = load_file(str(path))
        assert sorted(state) == trainable and not any(n.startswith("transformer.h.0.") for n in state)
        rebuilt.load_state_dict(state, strict=False)
        for split, dataset in (("train", train_set), ("test", probe_set)):
            table = read_loss_table(fetched.train_losses if split == "train" else fetched.test_losses)
            np.testing.assert_array_equal(table.example_ids, dataset.ids)
            np.testing.assert_allclose(table.values[STEPS.index(step)].numpy(), hand_nll(rebuilt, dataset),
                                       rtol=2e-5, atol=2e-6)
    examples = pd.read_parquet(fetched.examples).set_index("example_id")
    assert examples.loc[3, "prompt"].endswith(">") and examples.flipped.sum() == 10
    assert client.get_metric_history(callback.run_id, "train_loss")[-1].step == 6


def test_without_mlflow_reporting_there_is_exactly_one_run(tracking_uri, tmp_path):
    callback, model, _, probe_set = run_trainer(tmp_path, "none")
    runs = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name("hf-contract").experiment_id])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(callback.run_id, "FINISHED")]
    assert "mlflow.parentRunId" not in runs[0].data.tags

    # The final model is registered (named after the experiment) as a pyfunc scorer built from safetensors
    # weights, the frozen block included: it returns each probe sequence's token-mean NLL.
    assert runs[0].data.tags["z0inf.registered_model"] == "hf-contract"
    served = mlflow.pyfunc.load_model("models:/hf-contract/1")
    assert served.metadata.get_input_schema().input_names() == ["input_ids", "attention_mask", "labels"]
    batch = default_data_collator([probe_set[i] for i in range(len(probe_set))])
    losses = served.predict({k: batch[k].numpy() for k in ("input_ids", "attention_mask", "labels")})
    np.testing.assert_allclose(losses, hand_nll(model.eval(), probe_set), rtol=2e-5, atol=2e-6)


class NanAfterFirstCheckpoint:
    """Token NLL for the first checkpoint's 6 batches (3 train, 3 probe), NaN from then on."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        losses = token_mean_nll(model, batch)
        return losses * float("nan") if self.calls > 6 else losses


def test_a_bad_loss_during_training_fails_both_runs_with_a_named_error(tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf-contract")
    with pytest.raises(InputError, match=r"train: loss_fn returned 16 NaN/inf loss\(es\) in batch 0 at step 2"):
        run_trainer(tmp_path, ["mlflow"], loss_fn=NanAfterFirstCheckpoint())
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("hf-contract").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"] and mlflow.active_run() is None
    contract = next(r for r in runs if "z0inf.contract" in r.data.tags)
    assert client.list_artifacts(contract.info.run_id) == [] and list_contract_runs(tracking_uri=tracking_uri) == []


def test_lm_recipes_registered_model_is_scored_for_promotion_as_its_loss_table_says(tracking_uri, tmp_path):
    """model_promotion scores a LM version by loading it through mlflow.pyfunc: each probe example's loss
    must be the final column of the run's logged test loss table (recorded by the callback, not the model)."""
    from z0inf_pipeline.defs.assets.promotion import held_out, per_example_scores
    from z0inf_pipeline.defs.resources import MlflowResource
    from z0inf_pipeline.integrations.hf import train_and_log_lm
    from z0inf_pipeline.tracking.registry import registered_version

    recipe = LMRecipe(n_train=40, n_probe=12, pretrain_steps=10, epochs=1, checkpoints=2, batch_size=8)
    run_id = train_and_log_lm(recipe, tracking_uri=tracking_uri)
    run = fetch_run(run_id, tracking_uri=tracking_uri, cache_dir=tmp_path / "cache")
    version = registered_version(run.tags)
    assert (version.name, version.version) == ("lm-letter-shift", "1")
    inputs, labels = held_out(recipe)
    losses, task = per_example_scores(version, inputs, labels, MlflowResource(tracking_uri=tracking_uri))
    table = read_loss_table(run.test_losses)
    assert task == "causal_lm" and labels is None
    np.testing.assert_allclose(losses, table.values[-1].numpy(), rtol=2e-5, atol=2e-6)
