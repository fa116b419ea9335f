"""Datasets with stable example ids: bundled scikit-learn data or any CSV / parquet table.

Tables are read a batch of rows at a time and mapped from the data cache (``table_files``), never held whole.

An example's ``example_id`` is fixed when the data is loaded (the row's position in the source,
or the table's own ``example_id`` column) and travels with it through splits, subsets, label noise
and relabelling, so scores, review decisions and retraining all talk about the same example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Literal, Mapping

import numpy as np
import torch

from ..errors import ConfigurationError, InputError
from ..influence.loss_tables import sorted_unique
from .table_files import prepared_table

BUILTIN_DATASETS = ("digits", "breast_cancer", "wine", "mnist1d")
NOISE_KINDS = ("uniform", "confusable")
_DIGITS_IMAGE_SHAPE = (1, 8, 8)


@dataclass(frozen=True)
class LabelNoise:
    """Flip ``fraction`` of the training labels: to a uniformly drawn other class, or to the class
    whose centroid lies nearest (``confusable``: mistakes a tired annotator would make)."""

    fraction: float
    kind: Literal["uniform", "confusable"] = "uniform"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ConfigurationError(f"label noise fraction {self.fraction}: must be in [0, 1)")
        if self.kind not in NOISE_KINDS:
            raise ConfigurationError(f"label noise kind {self.kind!r}: must be one of {list(NOISE_KINDS)}")


@dataclass(frozen=True)
class Split:
    """Examples of one split, in a fixed order; ``labels`` are the labels used for training."""

    example_ids: np.ndarray
    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.example_ids)


@dataclass(frozen=True)
class DatasetBundle:
    name: str
    train: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    flipped_ids: np.ndarray
    clean_train_labels: torch.Tensor
    class_names: tuple[str, ...] = field(default=())
    feature_names: tuple[str, ...] = field(default=())  # the columns of a table, in feature order


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    test_fraction: float = 0.25,
    label_noise: LabelNoise | None = None,
    label_column: str = "label",
    image: bool = False,
) -> DatasetBundle:
    """Load a built-in dataset (``BUILTIN_DATASETS``) or a ``.csv`` / ``.parquet`` table; split it stratified.

    Features are standardised with statistics of the training split only (per feature; for
    digits as images, one mean and scale for all pixels so the picture keeps its contrast).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigurationError(f"test_fraction {test_fraction}: must be between 0 and 1")
    if name not in BUILTIN_DATASETS:
        return _table_bundle(name, seed, test_fraction, label_noise, label_column, image)
    ids, features, labels, class_names, feature_names = _load_builtin(name)
    if image and name != "digits":
        raise InputError(f"dataset {name}: image=True is only available for digits")
    input_shape = _DIGITS_IMAGE_SHAPE if image else (features.shape[1],)
    train_pos, test_pos = _stratified_split(labels, test_fraction, seed, name)
    train_x, test_x = _standardise(features[train_pos], features[test_pos], per_feature=not image)
    _check_standardised(train_x, test_x, feature_names, name)
    clean = labels[train_pos]
    return _bundle(
        name, class_names, () if image else feature_names, input_shape,
        (ids[train_pos], train_x, clean, lambda: class_centroids(train_x, clean, len(class_names))),
        (ids[test_pos], test_x, labels[test_pos]), label_noise,
    )


def _table_bundle(name: str, seed: int, test_fraction: float, label_noise: LabelNoise | None,
                  label_column: str, image: bool) -> DatasetBundle:
    """A CSV or parquet table, split and standardised once into the data cache (``table_files``) and mapped
    from there: features are never read whole into memory."""
    path = Path(name)
    if path.suffix.lower() not in (".csv", ".parquet"):
        raise InputError(
            f"dataset {name!r}: not a known dataset ({', '.join(BUILTIN_DATASETS)}) nor a .csv/.parquet file"
        )
    if not path.is_file():
        raise InputError(f"dataset {path}: no such file")
    if image:
        raise InputError(f"dataset {name}: image=True is only available for digits")
    table = prepared_table(
        path, label_column, lambda labels: _stratified_split(labels, test_fraction, seed, name),
        {"seed": seed, "test_fraction": test_fraction},
    )
    width = len(table.feature_names)
    return _bundle(
        name, table.class_names, table.feature_names, (width,),
        (table.train_ids, table.train_features, table.train_labels, lambda: table.train_class_centroids),
        (table.test_ids, table.test_features, table.test_labels), label_noise,
    )


def _bundle(name, class_names, feature_names, input_shape, train, test, label_noise) -> DatasetBundle:
    """The bundle of a split dataset, with its label noise: ``train`` is (ids, features, clean labels, its
    standardised class centroids on demand), ``test`` (ids, features, labels)."""
    train_ids, train_x, clean, centroids = train
    noisy, flipped = clean, np.zeros(len(clean), dtype=bool)
    if label_noise is not None and label_noise.fraction > 0:
        noisy, flipped = _inject_noise(clean, len(class_names), label_noise, centroids)
    return DatasetBundle(
        name=name,
        train=_split(train_ids, train_x, noisy, input_shape),
        test=_split(*test, input_shape),
        num_classes=len(class_names),
        input_shape=input_shape,
        flipped_ids=train_ids[flipped],
        clean_train_labels=torch.from_numpy(clean.astype(np.int64, copy=False)),
        class_names=class_names,
        feature_names=feature_names,
    )


def subset(split: Split, keep_ids: Iterable[int]) -> Split:
    """The examples of ``split`` whose id is in ``keep_ids``, in the split's own order."""
    keep = _known_ids(split, keep_ids, "subset")
    mask = torch.from_numpy(np.isin(split.example_ids, keep))
    if bool(mask.all()):  # a view, not a copy: a mapped table's features stay on disk until touched
        return split
    return Split(split.example_ids[mask.numpy()], split.features[mask], split.labels[mask])


def relabel(split: Split, new_labels: Mapping[int, int] | Iterable[tuple[int, int]], num_classes: int) -> Split:
    """A copy of ``split`` with the labels of the given example ids replaced."""
    pairs = dict(new_labels)
    if not pairs:
        return split
    ids = _known_ids(split, pairs.keys(), "relabel")
    values = np.asarray([pairs[int(i)] for i in ids], dtype=np.int64)
    bad = values[(values < 0) | (values >= num_classes)]
    if len(bad):
        raise InputError(f"relabel: label(s) {bad[:5].tolist()} out of range [0, {num_classes})")
    order = np.argsort(split.example_ids)
    positions = order[np.searchsorted(split.example_ids, ids, sorter=order)]
    labels = split.labels.clone()
    labels[torch.from_numpy(positions)] = torch.from_numpy(values)
    return replace(split, labels=labels)


def curate_train(
    bundle: DatasetBundle,
    *,
    exclude_ids: Iterable[int] = (),
    relabels: Iterable[tuple[int, int]] = (),
    train_subset: Iterable[int] | None = None,
) -> DatasetBundle:
    """The bundle as it will be trained: optionally only ``train_subset``, minus ``exclude_ids``,
    with ``relabels`` applied. Every id must be a training id of the full bundle (a typo fails loudly);
    ``clean_train_labels`` and ``flipped_ids`` follow the kept examples."""
    train = bundle.train
    exclude = _known_ids(train, exclude_ids, "exclude_ids")
    pairs = {int(i): int(y) for i, y in relabels}
    _known_ids(train, pairs.keys(), "relabels")
    if not len(exclude) and not pairs and train_subset is None:
        return bundle  # nothing to curate: no O(N) set operations on a 10^6-example split
    keep = train.example_ids if train_subset is None else _known_ids(train, train_subset, "train_subset")
    keep = np.setdiff1d(keep, exclude, assume_unique=True)
    if len(keep) == 0:
        raise InputError(f"dataset {bundle.name}: curation leaves no training examples")
    mask = np.isin(train.example_ids, keep)
    kept = subset(train, keep)
    kept_ids = set(keep.tolist())
    kept = relabel(kept, {i: y for i, y in pairs.items() if int(i) in kept_ids}, bundle.num_classes)
    return replace(
        bundle,
        train=kept,
        clean_train_labels=bundle.clean_train_labels[torch.from_numpy(mask)],
        flipped_ids=bundle.flipped_ids[np.isin(bundle.flipped_ids, keep)],
    )


def _known_ids(split: Split, ids: Iterable[int], what: str) -> np.ndarray:
    given = ids if isinstance(ids, np.ndarray) else np.fromiter((int(i) for i in ids), dtype=np.int64)
    wanted = sorted_unique(given.astype(np.int64, copy=False))
    unknown = np.setdiff1d(wanted, split.example_ids, assume_unique=True)
    if len(unknown):
        raise InputError(
            f"{what}: {len(unknown)} example id(s) are not in the training split, e.g. {unknown[:5].tolist()}"
        )
    return wanted


def _split(ids: np.ndarray, features: np.ndarray, labels: np.ndarray, input_shape: tuple[int, ...]) -> Split:
    x = torch.from_numpy(features.astype(np.float32, copy=False)).reshape(len(ids), *input_shape)
    return Split(ids.astype(np.int64, copy=False), x, torch.from_numpy(labels.astype(np.int64, copy=False)))


def _load_builtin(name: str):
    """(ids, float64 features (N, D), int labels 0..C-1, class names, feature names) of a built-in dataset."""
    if name == "mnist1d":
        features, labels = _mnist1d()
        names = tuple(str(c) for c in range(10))
        feature_names = tuple(f"x{i}" for i in range(features.shape[1]))
        return np.arange(len(labels), dtype=np.int64), features, labels, names, feature_names
    from sklearn import datasets

    data = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer,
            "wine": datasets.load_wine}[name]()
    names = tuple(str(n) for n in data.target_names)
    features = data.data.astype(np.float64)
    feature_names = tuple(str(n) for n in getattr(data, "feature_names", range(features.shape[1])))
    return np.arange(len(data.target), dtype=np.int64), features, data.target, names, feature_names


@lru_cache(maxsize=1)
def _mnist1d() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-1D (Greydanus, 2020) as its package generates it procedurally with its default arguments
    (fixed seed, nothing downloaded): its 4000 train and 1000 test examples pooled, ids = positions."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise InputError("dataset mnist1d: needs the mnist1d package (pip install mnist1d)") from None
    data = make_dataset(get_dataset_args())
    features = np.concatenate([data["x"], data["x_test"]]).astype(np.float64)
    labels = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    features.setflags(write=False)
    labels.setflags(write=False)
    return features, labels


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int, source: str):
    """Sorted train and test positions: the split scikit-learn's ``train_test_split(stratify=labels,
    random_state=seed)`` makes, drawn the same way (same sizes, same random stream), without its
    memory: it gathers both sides as Python lists of numpy integers, 116 MB of a 10^6-row table."""
    classes, codes, counts = _class_codes(labels)
    n = len(labels)
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    problem = (
        f"classes {classes[counts < 2].tolist()[:10]} have a single example" if (counts < 2).any()
        else "the training split would be empty" if n_train == 0
        else f"{n_train} training examples for {len(classes)} classes" if n_train < len(classes)
        else f"{n_test} test examples for {len(classes)} classes" if n_test < len(classes)
        else None
    )
    if problem:
        raise InputError(f"dataset {source}: cannot split stratified with test_fraction {test_fraction} ({problem})")
    rng = np.random.RandomState(seed)
    train_counts = _approximate_mode(counts, n_train, rng)
    _approximate_mode(counts - train_counts, n_test, rng)  # the test counts: what is left; drawn for the stream
    by_class = np.split(np.argsort(codes, kind="stable"), np.cumsum(counts)[:-1])
    in_train = np.zeros(n, dtype=bool)
    for positions, count, kept in zip(by_class, counts, train_counts):
        in_train[positions.take(rng.permutation(count))[:kept]] = True
    return np.flatnonzero(in_train), np.flatnonzero(~in_train)


def _class_codes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted classes, each label's class index, examples per class); labels that already are the codes
    0..C-1 (every class present) are used as they are, without ``np.unique``'s sorted copies."""
    if labels.dtype.kind in "iu" and len(labels) and labels.min() >= 0:
        counts = np.bincount(labels)
        if (counts > 0).all():
            return np.arange(len(counts)), labels, counts
    classes, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return classes, codes, counts


def _approximate_mode(class_counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """scikit-learn's approximate mode of the multivariate hypergeometric: each class's floored share of
    ``draws``, the rest going to the largest remainders, ties broken by ``rng``."""
    continuous = class_counts / class_counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            add = min(len(tied), need)
            floored[rng.choice(tied, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def _standardise(train: np.ndarray, test: np.ndarray, *, per_feature: bool):
    axis = 0 if per_feature else None
    mean, std = train.mean(axis=axis), train.std(axis=axis)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def _check_standardised(train: np.ndarray, test: np.ndarray, feature_names: tuple[str, ...], source: str) -> None:
    """Finite raw values can still overflow while standardising (a column of +-1e308 has an infinite
    mean and scale): refuse them by name instead of training on NaN."""
    bad = ~(np.isfinite(train).all(axis=0) & np.isfinite(test).all(axis=0))
    if bad.any():
        names = [n for n, b in zip(feature_names, bad) if b]
        raise InputError(
            f"dataset {source}: feature column(s) {names[:10]} are NaN or inf after standardisation (values too "
            "large for float64 mean and variance); rescale them"
        )


def _inject_noise(clean: np.ndarray, num_classes: int, noise: LabelNoise, centroids: Callable[[], np.ndarray]):
    rng = np.random.default_rng(noise.seed)
    count = int(round(noise.fraction * len(clean)))
    chosen = rng.choice(len(clean), size=count, replace=False)
    noisy = clean.copy()
    if noise.kind == "uniform":
        noisy[chosen] = (clean[chosen] + rng.integers(1, num_classes, size=count)) % num_classes
    else:
        noisy[chosen] = nearest_other_class(centroids())[clean[chosen]]
    flipped = np.zeros(len(clean), dtype=bool)
    flipped[chosen] = True
    return noisy, flipped


def class_centroids(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean feature vector of each class, (C, D)."""
    return np.stack([features[labels == c].mean(axis=0) for c in range(num_classes)])


def nearest_other_class(centroids: np.ndarray) -> np.ndarray:
    """For each class, the other class whose centroid is nearest to its own (ties to the lower class)."""
    distances = ((centroids[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=-1)
    np.fill_diagonal(distances, np.inf)
    return distances.argmin(axis=1)


def confusable_classes(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """For each class, the other class whose centroid is nearest to its own (ties to the lower class)."""
    return nearest_other_class(class_centroids(features, labels, num_classes))
