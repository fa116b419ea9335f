"""Datasets: stable ids, train-only standardisation, stratified splits, label noise, tables, curation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import datasets as skdatasets
from sklearn.model_selection import train_test_split

from z0inf_pipeline.errors import InputError
from z0inf_pipeline.training import (
    LabelNoise,
    confusable_classes,
    curate_train,
    load_dataset,
    relabel,
    subset,
)
from z0inf_pipeline.training.datasets import _stratified_split


@pytest.fixture(scope="module")
def raw_digits():
    data = skdatasets.load_digits()
    return data.data.astype(np.float64), data.target


def test_digits_ids_are_source_rows_and_features_standardised_on_train_only(raw_digits):
    x, y = raw_digits
    bundle = load_dataset("digits", seed=3, test_fraction=0.3)
    train_ids, test_ids = bundle.train.example_ids, bundle.test.example_ids
    assert len(np.intersect1d(train_ids, test_ids)) == 0
    assert np.array_equal(np.sort(np.concatenate([train_ids, test_ids])), np.arange(len(y)))
    mean, std = x[train_ids].mean(axis=0), x[train_ids].std(axis=0)
    std[std == 0] = 1.0
    np.testing.assert_allclose(bundle.train.features.numpy(), (x[train_ids] - mean) / std, atol=1e-5)
    np.testing.assert_allclose(bundle.test.features.numpy(), (x[test_ids] - mean) / std, atol=1e-5)
    assert np.array_equal(bundle.train.labels.numpy(), y[train_ids])
    assert np.array_equal(bundle.test.labels.numpy(), y[test_ids])
    assert bundle.num_classes == 10 and bundle.input_shape == (64,)


def test_split_is_stratified_and_deterministic(raw_digits):
    _, y = raw_digits
    a, b = load_dataset("digits", seed=1), load_dataset("digits", seed=1)
    assert np.array_equal(a.test.example_ids, b.test.example_ids)
    assert not np.array_equal(a.test.example_ids, load_dataset("digits", seed=2).test.example_ids)
    share = np.bincount(y[a.test.example_ids], minlength=10) / np.bincount(y, minlength=10)
    assert np.all(np.abs(share - 0.25) < 0.03)


@pytest.mark.parametrize(
    ("labels", "fraction", "seed"),
    [
        (skdatasets.load_digits().target, 0.25, 0),
        (skdatasets.load_wine().target, 0.3, 7),
        (np.repeat([5, 9, 11], [3, 40, 400]), 0.1, 2),  # codes to be made: classes 5, 9, 11, one rare
        (np.array(["emu", "cat", "dog"] * 33 + ["cat"]), 0.25, 1),  # text labels, tied remainders
        (np.random.default_rng(4).integers(0, 7, 100_000), 0.01, 3),
    ],
)
def test_the_stratified_split_is_scikit_learns(labels, fraction, seed):
    train, test = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed)
    ours = _stratified_split(labels, fraction, seed, "labels")
    assert ours[0].tolist() == sorted(train) and ours[1].tolist() == sorted(test)


def test_a_split_it_cannot_stratify_names_the_dataset_and_the_reason():
    with pytest.raises(InputError, match=r"dataset few: cannot split stratified .*classes \[2\] have a single"):
        _stratified_split(np.array([0, 0, 1, 1, 2]), 0.4, 0, "few")


def test_digits_as_images_keep_the_pixel_grid(raw_digits):
    x, _ = raw_digits
    bundle = load_dataset("digits", image=True)
    assert bundle.input_shape == (1, 8, 8) and bundle.train.features.shape[1:] == (1, 8, 8)
    ids = bundle.train.example_ids
    expected = (x[ids] - x[ids].mean()) / x[ids].std()
    np.testing.assert_allclose(bundle.train.features.reshape(len(ids), 64).numpy(), expected, atol=1e-5)


def test_breast_cancer_loads():
    bundle = load_dataset("breast_cancer")
    assert bundle.num_classes == 2 and bundle.input_shape == (30,)
    assert len(bundle.train) + len(bundle.test) == 569


@pytest.mark.parametrize("kind", ["uniform", "confusable"])
def test_label_noise_flips_the_recorded_ids_only(kind):
    clean = load_dataset("digits")
    noisy = load_dataset("digits", label_noise=LabelNoise(0.1, kind=kind, seed=5))
    assert np.array_equal(noisy.train.example_ids, clean.train.example_ids)
    assert torch.equal(noisy.clean_train_labels, clean.train.labels)
    assert torch.equal(noisy.test.labels, clean.test.labels)
    changed = noisy.train.example_ids[(noisy.train.labels != clean.train.labels).numpy()]
    assert np.array_equal(np.sort(changed), np.sort(noisy.flipped_ids))
    assert len(changed) == round(0.1 * len(clean.train))
    again = load_dataset("digits", label_noise=LabelNoise(0.1, kind=kind, seed=5))
    other = load_dataset("digits", label_noise=LabelNoise(0.1, kind=kind, seed=6))
    assert np.array_equal(again.flipped_ids, noisy.flipped_ids)
    assert not np.array_equal(other.flipped_ids, noisy.flipped_ids)


def test_confusable_noise_sends_each_class_to_its_nearest_centroid_class():
    bundle = load_dataset("digits", label_noise=LabelNoise(0.2, kind="confusable", seed=0))
    features = bundle.train.features.numpy().astype(np.float64)
    clean = bundle.clean_train_labels.numpy()
    # brute force over pairs, independent of the vectorised implementation
    centroids = [features[clean == c].mean(axis=0) for c in range(10)]
    nearest = [
        min((d for d in range(10) if d != c), key=lambda d: float(np.sum((centroids[c] - centroids[d]) ** 2)))
        for c in range(10)
    ]
    assert confusable_classes(features, clean, 10).tolist() == nearest
    flipped = np.isin(bundle.train.example_ids, bundle.flipped_ids)
    assert np.array_equal(bundle.train.labels.numpy()[flipped], np.asarray(nearest)[clean[flipped]])


def test_table_datasets_use_their_id_column_and_map_labels(tmp_path):
    rng = np.random.default_rng(0)
    n = 120
    frame = pd.DataFrame({
        "example_id": np.arange(1000, 1000 + n)[::-1],
        "a": rng.normal(size=n), "b": rng.normal(size=n), "flag": rng.integers(0, 2, size=n).astype(bool),
        "species": np.array(["cat", "dog", "emu"])[np.arange(n) % 3],
    })
    for path in (tmp_path / "t.csv", tmp_path / "t.parquet"):
        frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
        bundle = load_dataset(str(path), label_column="species", seed=0)
        assert bundle.class_names == ("cat", "dog", "emu") and bundle.input_shape == (3,)
        by_id = frame.set_index("example_id")
        for split in (bundle.train, bundle.test):
            expected = by_id.loc[split.example_ids, "species"].map({"cat": 0, "dog": 1, "emu": 2}).to_numpy()
            assert np.array_equal(split.labels.numpy(), expected)
        raw = by_id.loc[bundle.train.example_ids, ["a", "b", "flag"]].to_numpy(np.float64)
        np.testing.assert_allclose(bundle.train.features.numpy(), (raw - raw.mean(0)) / raw.std(0), atol=1e-5)


@pytest.mark.parametrize(
    ("frame", "kwargs", "message"),
    [
        (pd.DataFrame({"x": [1.0, 2.0], "y": [0, 1]}), {}, "no label column 'label'"),
        (pd.DataFrame({"x": ["a", "b"] * 4, "label": [0, 1] * 4}), {}, "not numeric"),
        (pd.DataFrame({"x": [1.0, np.nan] * 4, "label": [0, 1] * 4}), {}, "missing or infinite"),
        (pd.DataFrame({"x": [1.0] * 8, "label": [0] * 8}), {}, "fewer than two classes"),
        (pd.DataFrame({"example_id": [1, 1, 2, 3], "x": [1.0] * 4, "label": [0, 1] * 2}), {}, "duplicate ids"),
    ],
)
def test_bad_tables_are_rejected_naming_file_and_column(tmp_path, frame, kwargs, message):
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(InputError, match=message) as info:
        load_dataset(str(path), **kwargs)
    assert str(path) in str(info.value)


def test_unknown_dataset_and_missing_file():
    with pytest.raises(InputError, match="not a known dataset"):
        load_dataset("mnist")
    with pytest.raises(InputError, match="no such file"):
        load_dataset("/nonexistent/table.csv")
    with pytest.raises(InputError, match="only available for digits"):
        load_dataset("breast_cancer", image=True)


def test_subset_and_relabel_keep_ids_and_features():
    bundle = load_dataset("digits")
    train = bundle.train
    keep = train.example_ids[::7][::-1]  # order of keep_ids does not matter
    part = subset(train, keep)
    assert np.array_equal(part.example_ids, train.example_ids[::7])  # the split's own order
    rows = {int(i): r for r, i in enumerate(train.example_ids)}
    for i, features, label in zip(part.example_ids, part.features, part.labels):
        assert torch.equal(features, train.features[rows[int(i)]]) and label == train.labels[rows[int(i)]]
    target = int(train.example_ids[3])
    new = relabel(train, [(target, (int(train.labels[3]) + 1) % 10)], 10)
    assert int(new.labels[3]) == (int(train.labels[3]) + 1) % 10
    assert torch.equal(new.labels[torch.arange(len(train)) != 3], train.labels[torch.arange(len(train)) != 3])
    with pytest.raises(InputError, match="not in the training split"):
        subset(train, [int(bundle.test.example_ids[0])])
    with pytest.raises(InputError, match="out of range"):
        relabel(train, [(target, 10)], 10)


def test_curate_train_keeps_clean_labels_and_flips_aligned():
    bundle = load_dataset("digits", label_noise=LabelNoise(0.1, seed=1))
    drop = bundle.flipped_ids[:20]
    sample = bundle.train.example_ids[::2]
    keep_flipped = bundle.flipped_ids[40]
    relabel_id = int(np.setdiff1d(sample, drop)[0])
    curated = curate_train(bundle, exclude_ids=drop, relabels=[(relabel_id, 0)],
                           train_subset=np.union1d(sample, [keep_flipped]))
    ids = curated.train.example_ids
    assert not np.isin(drop, ids).any() and keep_flipped in ids
    assert set(ids) == set(np.setdiff1d(np.union1d(sample, [keep_flipped]), drop))
    full_rows = {int(i): r for r, i in enumerate(bundle.train.example_ids)}
    expected_clean = bundle.clean_train_labels[[full_rows[int(i)] for i in ids]]
    assert torch.equal(curated.clean_train_labels, expected_clean)
    assert np.array_equal(curated.flipped_ids, bundle.flipped_ids[np.isin(bundle.flipped_ids, ids)])
    assert int(curated.train.labels[np.flatnonzero(ids == relabel_id)[0]]) == 0
    with pytest.raises(InputError, match="exclude_ids: 1 example id"):
        curate_train(bundle, exclude_ids=[int(bundle.test.example_ids[0])])


@pytest.mark.parametrize("name, classes, features", [("wine", 3, 13), ("mnist1d", 10, 40)])
def test_bundled_wine_and_procedural_mnist1d_load_without_downloads(name, classes, features):
    bundle = load_dataset(name)
    assert bundle.num_classes == classes and bundle.input_shape == (features,)
    assert np.intersect1d(bundle.train.example_ids, bundle.test.example_ids).size == 0
    again = load_dataset(name)
    assert torch.equal(bundle.train.features, again.train.features)  # generated deterministically
