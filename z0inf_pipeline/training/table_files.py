"""CSV and parquet datasets: read a batch of rows at a time with pyarrow datasets, prepared once into
memory-mapped arrays, so no process ever holds the table whole.

Why: a table of 10^6+ rows held as arrays costs several times its size (the float64 features, each
split's copy, the standardised copy), and it did so in every process that used it: training, and each
loss-table shard step, which rebuilt the whole dataset to evaluate its slice. Now the first process to
need a table streams it (three passes: ids and labels, the training split's statistics, the standardised
rows) into flat files in the data cache, keyed by the file's identity and the split; every later load
maps those files. A process holds only the pages it touches: a shard step its own rows, training the
batches drawn since it last called ``release_pages``.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ..errors import InputError
from ..influence.loss_tables import ID_COLUMN, return_arrow_memory, sorted_unique
from ..settings import data_dir

# Rows per batch: 65,536 rows of 100 float64 features are 50 MB, small beside the feature array of
# a table worth streaming, large enough that per-batch costs vanish.
READ_BATCH_ROWS = 65_536
CSV_BLOCK_BYTES = 1 << 17
# Bump when the prepared files' content or layout changes: older caches are then never read.
PREPARED_FORMAT = 2
SplitPositions = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

# Feature maps this process opened, so ``release_pages`` can hand their resident pages back.
_OPEN_MAPS: "weakref.WeakSet[mmap.mmap]" = weakref.WeakSet()


@dataclass(frozen=True)
class TableFile:
    """A CSV or parquet file opened for batched reads: its label column and numeric feature columns checked."""

    path: Path
    schema: pa.Schema  # a CSV's column types inferred from its first block, as pyarrow datasets do
    source: str
    label_column: str
    feature_names: tuple[str, ...]

    def batches(self, columns: list[str], batch_rows: int = READ_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """``columns`` in record batches of at most ``batch_rows`` rows, in file order; a value that does not
        parse as its column's type is an InputError naming the file.

        Sequential readers, not the dataset's scanner: when the consumer is slower than decoding (each batch
        standardised and written), the scanner kept decoding ahead and held nearly the whole file (27 MB of a
        29 MB table in a test); a streaming CSV reader and parquet's ``iter_batches`` hold a block or a row
        group at a time."""
        try:
            if self.path.suffix.lower() == ".csv":
                types = {c: self.schema.field(c).type for c in columns}
                reader = pacsv.open_csv(self.path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                                        convert_options=pacsv.ConvertOptions(include_columns=columns, column_types=types))
            else:
                reader = pq.ParquetFile(self.path, pre_buffer=False).iter_batches(batch_size=batch_rows, columns=columns,
                                                                                   use_threads=False)
            for batch in reader:
                for start in range(0, batch.num_rows, batch_rows):
                    yield batch.slice(start, batch_rows)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"dataset {self.source}: cannot be read ({exc})") from None

    def feature_batches(self, batch_rows: int = READ_BATCH_ROWS) -> Iterator[np.ndarray]:
        """The feature columns as float64 (rows, D) arrays, a batch at a time; a missing or infinite value is
        an InputError naming the file and the column."""
        for batch in self.batches(list(self.feature_names), batch_rows):
            features = np.empty((batch.num_rows, len(self.feature_names)), dtype=np.float64)
            for j, column in enumerate(batch.columns):
                features[:, j] = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
            missing = ~np.isfinite(features).all(axis=0)
            if missing.any():
                bad = [c for c, m in zip(self.feature_names, missing) if m]
                raise InputError(f"dataset {self.source}: feature column(s) {bad} have missing or infinite values")
            yield features

    def ids_and_labels(self, batch_rows: int = READ_BATCH_ROWS) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        """The id column (row positions without one) and the labels mapped to 0..C-1, with the class names."""
        schema = self.schema
        has_ids = ID_COLUMN in schema.names
        if has_ids and not pa.types.is_integer(schema.field(ID_COLUMN).type):
            raise InputError(
                f"dataset {self.source}: column '{ID_COLUMN}' must hold integers, not {schema.field(ID_COLUMN).type}"
            )
        wanted = [self.label_column, ID_COLUMN] if has_ids else [self.label_column]
        label_parts, id_parts = [], []
        for batch in self.batches(wanted, batch_rows):
            label_parts.append(batch.column(0))
            if has_ids:
                id_parts.append(batch.column(1))
        labels = pa.chunked_array(label_parts, type=schema.field(self.label_column).type)
        if labels.null_count:
            raise InputError(f"dataset {self.source}: label column {self.label_column!r} has missing values")
        if pa.types.is_dictionary(labels.type):  # a pandas categorical: its values are the labels
            labels = labels.cast(labels.type.value_type)
        if has_ids:
            ids_column = pa.chunked_array(id_parts, type=schema.field(ID_COLUMN).type)
            if ids_column.null_count:
                raise InputError(f"dataset {self.source}: column '{ID_COLUMN}' has missing values")
            ids = ids_column.to_numpy().astype(np.int64, copy=False)
            ordered = np.sort(ids)
            repeated = ordered[1:][ordered[1:] == ordered[:-1]]
            if len(repeated):
                raise InputError(
                    f"dataset {self.source}: column '{ID_COLUMN}' has duplicate ids, e.g. {sorted_unique(repeated)[:5].tolist()}"
                )
            del ordered
        else:
            ids = np.arange(len(labels), dtype=np.int64)
        classes = np.sort(pc.unique(labels).to_numpy(zero_copy_only=False))
        if len(classes) < 2:
            raise InputError(f"dataset {self.source}: label column {self.label_column!r} has fewer than two classes")
        # each label's index among the sorted classes (np.unique's codes), a chunk at a time: no sorted copies
        value_set = pa.array(classes, type=labels.type)
        codes = np.empty(len(labels), dtype=np.int64)
        row = 0
        for chunk in labels.chunks:
            codes[row : row + len(chunk)] = pc.index_in(chunk, value_set=value_set).to_numpy()
            row += len(chunk)
        return ids, codes, tuple(str(c) for c in classes)


def open_table(path: Path, label_column: str) -> TableFile:
    """``path`` opened for batched reads, its columns checked; bad content is an InputError naming the file."""
    source = str(path)
    schema = _schema(path)
    columns = schema.names
    if label_column not in columns:
        raise InputError(f"dataset {source}: has no label column {label_column!r} (columns: {columns})")
    feature_cols = [c for c in columns if c not in (label_column, ID_COLUMN)]
    if not feature_cols:
        raise InputError(f"dataset {source}: has no feature columns besides {label_column!r}")
    non_numeric = [c for c in feature_cols if not _numeric(schema.field(c).type)]
    if non_numeric:
        raise InputError(f"dataset {source}: feature column(s) {non_numeric} are not numeric")
    return TableFile(path, schema, source, label_column, tuple(feature_cols))


@dataclass(frozen=True)
class PreparedTable:
    """A table split and standardised with its training split's statistics (per feature). Ids, labels
    (int64) and features (float32) are arrays mapped from the data cache, copy-on-write: a write changes
    nothing on disk and is dropped by the next ``release_pages``, so copy an array before changing it (as
    label noise and relabelling do); ``train_class_centroids`` are the standardised training features'
    class means (for confusable noise)."""

    source: str
    class_names: tuple[str, ...]
    feature_names: tuple[str, ...]
    train_ids: np.ndarray
    train_labels: np.ndarray
    train_features: np.ndarray
    test_ids: np.ndarray
    test_labels: np.ndarray
    test_features: np.ndarray
    train_class_centroids: np.ndarray


def prepared_table(
    path: Path, label_column: str, split_positions: SplitPositions, split_key: dict, *, batch_rows: int = READ_BATCH_ROWS
) -> PreparedTable:
    """The table at ``path`` split by ``split_positions(labels)`` (sorted row positions of train and test)
    and standardised, from the data cache; prepared there first, a batch at a time, if missing.
    ``split_key`` names everything the split depends on (seed, test fraction): it is part of the cache key."""
    folder = _cache_folder(path, label_column, split_key)
    if not (folder / "meta.json").is_file():
        _prepare(open_table(path, label_column), split_positions, folder, batch_rows)
    return _load(folder, str(path))


def release_pages() -> None:
    """Hand back the resident pages of every prepared table this process mapped: they stay valid and are
    read again from the page cache when touched. Training calls it every few steps, so its memory holds
    recent batches, not every row an epoch has drawn so far."""
    for mapped in list(_OPEN_MAPS):
        if not mapped.closed:
            mapped.madvise(mmap.MADV_DONTNEED)


def scratch_array(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A zeroed array over an unlinked file in the data cache, mapped shared and handed back by
    ``release_pages`` like a prepared table: a (T, N) loss record of a 10^6-example split lives on disk,
    its pages resident only while written or read. The file vanishes with the last reference."""
    count = int(np.prod(shape))
    nbytes = count * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    folder = data_dir() / "cache" / "scratch"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder) as file:  # unlinked at once: nothing is left after a crash
        file.truncate(nbytes)
        mapped = mmap.mmap(file.fileno(), nbytes)
    _OPEN_MAPS.add(mapped)
    return np.frombuffer(mapped, dtype=dtype, count=count).reshape(shape)


def _cache_folder(path: Path, label_column: str, split_key: dict) -> Path:
    """``<data dir>/cache/tables/<key>``: the key hashes the file's identity (resolved path, size, modification
    time), the label column, the split and the format, so a changed file or split is prepared anew."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise InputError(f"dataset {path}: cannot be read ({exc.strerror})") from None
    identity = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "label_column": label_column, "split": split_key, "format": PREPARED_FORMAT}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    return data_dir() / "cache" / "tables" / key


def _prepare(table: TableFile, split_positions: SplitPositions, folder: Path, batch_rows: int) -> None:
    """Write the prepared files into a temporary folder renamed into place: a reader sees all or nothing, and
    of two processes preparing the same table at once, the second keeps the first one's files."""
    ids, labels, class_names = table.ids_and_labels(batch_rows)
    train_pos, test_pos = split_positions(labels)
    is_train = np.zeros(len(labels), dtype=bool)
    is_train[train_pos] = True
    mean, scale, centroids = _training_statistics(table, is_train, labels, len(class_names), batch_rows)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        with open(work / "train_features.f32", "wb") as train_out, open(work / "test_features.f32", "wb") as test_out:
            row = 0
            for features in table.feature_batches(batch_rows):
                standardised = ((features - mean) / scale).astype(np.float32)
                in_train = is_train[row : row + len(features)]
                standardised[in_train].tofile(train_out)
                standardised[~in_train].tofile(test_out)
                row += len(features)
        for name, values in (("train_ids", ids[train_pos]), ("train_labels", labels[train_pos]),
                             ("test_ids", ids[test_pos]), ("test_labels", labels[test_pos])):
            values.astype(np.int64, copy=False).tofile(work / f"{name}.i64")
        np.save(work / "train_class_centroids.npy", centroids, allow_pickle=False)
        meta = {"format": PREPARED_FORMAT, "class_names": list(class_names), "feature_names": list(table.feature_names),
                "train_rows": len(train_pos), "test_rows": len(test_pos)}
        (work / "meta.json").write_text(json.dumps(meta))
        try:
            work.rename(folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        return_arrow_memory()


def _training_statistics(table: TableFile, is_train: np.ndarray, labels: np.ndarray, num_classes: int,
                         batch_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-feature mean and scale (population standard deviation, 1 where it is 0) of the training rows, and
    the standardised class centroids, in one float64 pass. Sums are taken about the first training row, so
    a column far from zero keeps its precision; values too large for float64 sums are refused by name."""
    width = len(table.feature_names)
    shift = None
    count, total, squares = 0, np.zeros(width), np.zeros(width)
    class_totals, class_counts = np.zeros((num_classes, width)), np.zeros(num_classes)
    row = 0
    with np.errstate(over="ignore", invalid="ignore"):
        for features in table.feature_batches(batch_rows):
            rows = slice(row, row + len(features))
            row += len(features)
            train = features[is_train[rows]]
            if not len(train):
                continue
            shift = train[0].copy() if shift is None else shift
            centred = train - shift
            count += len(train)
            total += centred.sum(axis=0)
            squares += (centred * centred).sum(axis=0)
            one_hot = np.eye(num_classes)[labels[rows][is_train[rows]]]
            class_totals += one_hot.T @ centred
            class_counts += one_hot.sum(axis=0)
        mean_offset = total / count
        variance = np.maximum(squares / count - mean_offset**2, 0.0)
        mean, scale = shift + mean_offset, np.sqrt(variance)
        scale = np.where(scale > 0, scale, 1.0)
        centroids = (class_totals / np.maximum(class_counts, 1)[:, None] - mean_offset) / scale
    bad = ~(np.isfinite(mean) & np.isfinite(scale) & (scale < np.inf))
    if bad.any():
        names = [n for n, b in zip(table.feature_names, bad) if b]
        raise InputError(
            f"dataset {table.source}: feature column(s) {names[:10]} are NaN or inf after standardisation (values too "
            "large for float64 mean and variance); rescale them"
        )
    return mean, scale, centroids


def _load(folder: Path, source: str) -> PreparedTable:
    meta = json.loads((folder / "meta.json").read_text())
    width = len(meta["feature_names"])
    rows = {"train": meta["train_rows"], "test": meta["test_rows"]}
    return PreparedTable(
        source=source, class_names=tuple(meta["class_names"]), feature_names=tuple(meta["feature_names"]),
        **{f"{split}_features": _mapped(folder / f"{split}_features.f32", (count, width), np.float32)
           for split, count in rows.items()},
        **{f"{split}_{kind}": _mapped(folder / f"{split}_{kind}.i64", (count,), np.int64)
           for split, count in rows.items() for kind in ("ids", "labels")},
        train_class_centroids=np.load(folder / "train_class_centroids.npy", allow_pickle=False),
    )


def _mapped(path: Path, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """An array over the file's pages, copy-on-write; a file of the wrong size (a truncated cache) is an
    InputError naming it."""
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if path.stat().st_size != expected:
        raise InputError(f"prepared table {path}: holds {path.stat().st_size} bytes, not {expected}; delete its folder")
    if expected == 0:
        return np.empty(shape, dtype=dtype)
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    _OPEN_MAPS.add(mapped)
    return np.frombuffer(mapped, dtype=dtype).reshape(shape)


def _schema(path: Path) -> pa.Schema:
    """The file's schema, from a pyarrow dataset (a CSV's types from its first 128 KiB block). Reads go
    through ``TableFile.batches``: a CSV a block at a time, a parquet file a row group at a time (one
    written as a single row group, pandas' default up to 2^20 rows, is decoded whole: write big files in
    row groups of about 10^5 rows)."""
    file_format = (ds.CsvFileFormat(read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES))
                   if path.suffix.lower() == ".csv" else ds.ParquetFileFormat())
    try:
        return ds.dataset(path, format=file_format).schema
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"dataset {path}: cannot be read ({exc})") from None


def _numeric(kind: pa.DataType) -> bool:
    """Numbers as pandas counts them (booleans too); an all-empty CSV column (null type) is numeric,
    so it is reported as missing values rather than as text."""
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or pa.types.is_null(kind)
