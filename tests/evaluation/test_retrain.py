"""Retraining on subsets with a real (tiny) training run: the cache, and losses checked against direct training."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from z0inf_pipeline.evaluation import config_key, subsample_and_retrain
from z0inf_pipeline.errors import InputError
from z0inf_pipeline.training import TrainConfig, train

TINY = TrainConfig(dataset="digits", model="logreg", epochs=1, checkpoints=2, batch_size=128)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train(TINY, tmp_path_factory.mktemp("ref") / "run")


def test_subsample_and_retrain_matches_direct_training_and_reuses_the_cache(reference, tmp_path):
    cache = tmp_path / "cache"
    first = subsample_and_retrain(reference, 3, cache, seed=4)
    assert first.models.trained == 3 and len(list(cache.glob("*.safetensors"))) == 3
    assert first.train_losses.shape == (3, len(reference.bundle.train))
    assert first.test_losses.shape == (3, len(reference.bundle.test))
    assert np.array_equal(first.train_ids, reference.bundle.train.example_ids)

    # Independent computation: train model 1's subset directly and evaluate it by hand.
    subset_ids = first.train_ids[first.masks[1]]
    direct = train(TINY.replace(train_subset=tuple(subset_ids)), tmp_path / "direct", record_losses=False).model
    with torch.no_grad():
        expected_train = F.cross_entropy(direct(reference.bundle.train.features), reference.bundle.train.labels,
                                         reduction="none")
        expected_test = F.cross_entropy(direct(reference.bundle.test.features), reference.bundle.test.labels,
                                        reduction="none")
    np.testing.assert_allclose(first.train_losses[1], expected_train.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first.test_losses[1], expected_test.numpy(), rtol=1e-5, atol=1e-6)

    again = subsample_and_retrain(reference, 3, cache, seed=4)
    assert again.models.trained == 0
    assert again.models.train_seconds == pytest.approx(first.models.train_seconds)
    assert first.models.train_seconds > 0
    np.testing.assert_array_equal(again.train_losses, first.train_losses)

    # A different draw of subsets trains new models next to the cached ones.
    other = subsample_and_retrain(reference, 2, cache, seed=5)
    assert other.models.trained == 2 and len(list(cache.glob("*.safetensors"))) == 5


def test_config_key_follows_the_subset_and_the_recipe():
    a = TINY.replace(train_subset=(1, 2, 3))
    assert config_key(a) == config_key(TINY.replace(train_subset=(1, 2, 3)))
    assert config_key(a) != config_key(TINY.replace(train_subset=(1, 2, 4)))
    assert config_key(a) != config_key(a.replace(lr=0.2))


def test_reference_must_use_the_whole_train_split(reference, tmp_path):
    partial = replace(reference, config=TINY.replace(train_subset=tuple(reference.bundle.train.example_ids[:50])))
    with pytest.raises(InputError, match="whole train split"):
        subsample_and_retrain(partial, 2, tmp_path)
