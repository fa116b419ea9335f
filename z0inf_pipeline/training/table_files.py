"""CSV and parquet datasets read with pyarrow datasets a batch of rows at a time, never as one table.

A table of 10^6+ rows read whole (pandas) held the parsed table, its float64 copy and pandas' parsing
buffers at once. Here a first pass reads only the label and id columns, a second pass the feature
columns, batch by batch, straight into the one float64 feature array the caller needs; what pyarrow
holds meanwhile is bounded by its read-ahead, not by the file's size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds

from ..errors import InputError
from ..influence.loss_tables import ID_COLUMN

# Rows per batch: 65,536 rows of 100 float64 features are 50 MB, small beside the feature array of
# a table worth streaming, large enough that per-batch costs vanish.
READ_BATCH_ROWS = 65_536
CSV_BLOCK_BYTES = 1 << 17


def read_table(path: Path, label_column: str, *, batch_rows: int = READ_BATCH_ROWS):
    """(ids, float64 features (N, D), int labels 0..C-1, class names, description for errors, feature
    names) of a ``.csv`` or ``.parquet`` file, read ``batch_rows`` rows at a time; bad content is an
    InputError naming the file and the column."""
    source = str(path)
    dataset = _open(path)
    columns = dataset.schema.names
    if label_column not in columns:
        raise InputError(f"dataset {source}: has no label column {label_column!r} (columns: {columns})")
    feature_cols = [c for c in columns if c not in (label_column, ID_COLUMN)]
    if not feature_cols:
        raise InputError(f"dataset {source}: has no feature columns besides {label_column!r}")
    non_numeric = [c for c in feature_cols if not _numeric(dataset.schema.field(c).type)]
    if non_numeric:
        raise InputError(f"dataset {source}: feature column(s) {non_numeric} are not numeric")
    ids, labels, classes = _ids_and_labels(dataset, label_column, source, batch_rows)
    features = np.empty((len(labels), len(feature_cols)), dtype=np.float64)
    row = 0
    for batch in table_batches(dataset, feature_cols, source, batch_rows):
        for j, column in enumerate(batch.columns):
            features[row : row + batch.num_rows, j] = _as_float64(column)
        row += batch.num_rows
    missing = ~np.isfinite(features)
    if missing.any():
        bad = [c for c, n in zip(feature_cols, missing.sum(axis=0)) if n]
        raise InputError(f"dataset {source}: feature column(s) {bad} have missing or infinite values")
    return ids, features, labels, classes, source, tuple(feature_cols)


def table_batches(dataset: ds.Dataset, columns: list[str], source: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """``columns`` of ``dataset`` in record batches of at most ``batch_rows`` rows, in file order; a
    value that does not parse as its column's type is an InputError naming the file."""
    try:
        yield from dataset.to_batches(columns=columns, batch_size=batch_rows, batch_readahead=1, fragment_readahead=1)
    except pa.ArrowException as exc:
        raise InputError(f"dataset {source}: cannot be read ({exc})") from None


def _open(path: Path) -> ds.Dataset:
    """The file as a pyarrow dataset whose scans hold a bounded amount of it: pyarrow reads a few dozen
    CSV blocks ahead, so blocks of 128 KiB (not 1 MiB) keep that near 6 MB whatever the file's size
    (40 MB with 1 MiB blocks); parquet column chunks are read as they are decoded, not buffered for the
    whole file first, so a scan holds a few row groups: a parquet file written as one row group (pandas'
    default up to 2^20 rows) is decoded whole; write big files in row groups of about 10^5 rows."""
    if path.suffix.lower() == ".csv":
        file_format = ds.CsvFileFormat(read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES))
    else:
        file_format = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(pre_buffer=False))
    try:
        return ds.dataset(path, format=file_format)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"dataset {path}: cannot be read ({exc})") from None


def _ids_and_labels(dataset: ds.Dataset, label_column: str, source: str, batch_rows: int):
    """The id column (row positions without one) and the labels mapped to 0..C-1 with their class names."""
    has_ids = ID_COLUMN in dataset.schema.names
    if has_ids and not pa.types.is_integer(dataset.schema.field(ID_COLUMN).type):
        raise InputError(
            f"dataset {source}: column '{ID_COLUMN}' must hold integers, not {dataset.schema.field(ID_COLUMN).type}"
        )
    wanted = [label_column, ID_COLUMN] if has_ids else [label_column]
    label_parts, id_parts = [], []
    for batch in table_batches(dataset, wanted, source, batch_rows):
        label_parts.append(batch.column(0))
        if has_ids:
            id_parts.append(batch.column(1))
    labels = pa.chunked_array(label_parts, type=dataset.schema.field(label_column).type)
    if labels.null_count:
        raise InputError(f"dataset {source}: label column {label_column!r} has missing values")
    if has_ids:
        ids_column = pa.chunked_array(id_parts, type=dataset.schema.field(ID_COLUMN).type)
        if ids_column.null_count:
            raise InputError(f"dataset {source}: column '{ID_COLUMN}' has missing values")
        ids = ids_column.to_numpy().astype(np.int64)
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise InputError(f"dataset {source}: column '{ID_COLUMN}' has duplicate ids, e.g. {unique[counts > 1][:5].tolist()}")
    else:
        ids = np.arange(len(labels), dtype=np.int64)
    classes, codes = np.unique(labels.to_numpy(zero_copy_only=False), return_inverse=True)
    if len(classes) < 2:
        raise InputError(f"dataset {source}: label column {label_column!r} has fewer than two classes")
    return ids, codes.astype(np.int64), tuple(str(c) for c in classes)


def _numeric(kind: pa.DataType) -> bool:
    """Numbers as pandas counts them (booleans too); an all-empty CSV column (null type) is numeric,
    so it is reported as missing values rather than as text."""
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or pa.types.is_null(kind)


def _as_float64(column: pa.Array) -> np.ndarray:
    """A numeric column as float64, nulls as NaN."""
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
