"""Rebuilding a run's data and re-evaluating its checkpoints (the loss_tables asset's work), against
what the trainer itself recorded while training. The CUDA test runs only where a GPU is present."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from z0inf_pipeline.errors import InputError
from z0inf_pipeline.influence.loss_tables import read_loss_table
from z0inf_pipeline.training import ModelSpec, TrainConfig, build_model, train
from z0inf_pipeline.training.reevaluate import final_predictions, max_deviation, rebuild_data, recompute_loss_tables
from z0inf_pipeline.training.trainer import TrainResult

CONFIG = TrainConfig(epochs=2, checkpoints=3, hidden=(16,), label_noise=0.1, exclude_ids=(0, 5), relabels=((7, 3),))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TrainResult:
    return train(CONFIG, tmp_path_factory.mktemp("run") / "run")


def rebuilt(result: TrainResult):
    examples = pd.read_parquet(result.examples)
    return rebuild_data("run", result.config.to_dict(), result.model_spec.to_dict(), examples)


def factory(result: TrainResult):
    return lambda: build_model(ModelSpec.from_dict(result.model_spec.to_dict()))


def last_model(result: TrainResult) -> torch.nn.Module:
    from z0inf_pipeline.influence import load_state_dict

    model = factory(result)()
    model.load_state_dict(load_state_dict(result.checkpoints[-1]))
    return model


def test_rebuilt_data_is_the_data_as_trained(trained):
    data = rebuilt(trained)
    np.testing.assert_array_equal(data.train.example_ids, trained.bundle.train.example_ids)
    torch.testing.assert_close(data.train.features, trained.bundle.train.features)
    assert torch.equal(data.train.labels, trained.bundle.train.labels)
    assert 0 not in data.train.example_ids and 5 not in data.train.example_ids
    assert int(data.train.labels[data.train.example_ids.tolist().index(7)]) == 3


def test_rebuild_refuses_a_run_whose_examples_disagree(trained):
    examples = pd.read_parquet(trained.examples)
    row = examples.index[examples["split"] == "train"][0]
    examples.loc[row, "label"] = (examples.loc[row, "label"] + 1) % 10
    with pytest.raises(InputError, match="does not match the run's examples table"):
        rebuild_data("run", trained.config.to_dict(), trained.model_spec.to_dict(), examples)
    assert rebuild_data("run", None, trained.model_spec.to_dict(), examples) is None
    assert rebuild_data("run", trained.config.to_dict(), {"factory": "pkg:fn"}, examples) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recomputed_cross_entropy_equals_the_tables_logged_while_training(trained, dtype):
    train_table, test_table = recompute_loss_tables(
        factory(trained), trained.checkpoints, rebuilt(trained), "cross_entropy", dtype=dtype, batch_size=500
    )
    assert max_deviation(train_table, read_loss_table(trained.train_losses)) < 1e-5
    assert max_deviation(test_table, read_loss_table(trained.test_losses)) < 1e-5


def test_zero_one_losses_and_predictions_agree_with_the_trainers_accuracy(trained):
    data = rebuilt(trained)
    _, test_table = recompute_loss_tables(factory(trained), trained.checkpoints, data, "zero_one")
    assert set(np.unique(test_table.values.numpy())) <= {0.0, 1.0}
    logged_accuracy = trained.metrics[-1]["test_accuracy"]
    # float32 mean; one error more or less would move it by 1/450
    assert float(test_table.values[-1].mean()) == pytest.approx(1 - logged_accuracy, abs=1e-6)
    predictions = final_predictions(last_model(trained), data)
    test_rows = predictions[predictions["split"] == "test"]
    assert (test_rows["predicted_label"] == test_rows["label"]).mean() == pytest.approx(logged_accuracy, abs=1e-6)
    assert predictions["confidence"].between(0, 1).all()
    with pytest.raises(InputError, match="must be one of"):
        recompute_loss_tables(factory(trained), trained.checkpoints, data, "hinge")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")
def test_on_cuda_the_numbers_match_the_cpu(trained):
    data = rebuilt(trained)
    cpu = recompute_loss_tables(factory(trained), trained.checkpoints, data, "cross_entropy")
    gpu = recompute_loss_tables(factory(trained), trained.checkpoints, data, "cross_entropy", device="cuda")
    for a, b in zip(cpu, gpu):
        np.testing.assert_array_equal(a.example_ids, b.example_ids)
        torch.testing.assert_close(b.values, a.values, rtol=1e-4, atol=1e-5)
    cpu_pred = final_predictions(last_model(trained), data)
    gpu_pred = final_predictions(last_model(trained), data, device="cuda", dtype=torch.float64)
    assert (cpu_pred["predicted_label"] == gpu_pred["predicted_label"]).all()
    np.testing.assert_allclose(gpu_pred["confidence"], cpu_pred["confidence"], rtol=1e-4, atol=1e-5)
