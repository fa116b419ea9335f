"""CSV and parquet datasets read in batches: the same bytes as reading the file whole with pandas (an
independent reader), pyarrow never holding the whole table of a big file, and prepared tables (split,
standardised, cached, memory-mapped) as numpy computes them from the whole file."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from z0inf_pipeline.errors import InputError
from z0inf_pipeline.training import table_files
from z0inf_pipeline.training.table_files import open_table, prepared_table, release_pages


def _write(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path, row_group_size=13)


def _whole(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_batches_give_the_bytes_of_a_whole_pandas_read(tmp_path, suffix):
    rng = np.random.default_rng(1)
    n = 101
    frame = pd.DataFrame({
        "example_id": rng.permutation(np.arange(5000, 5000 + n)),
        "a": rng.normal(size=n) * 1e3, "b": rng.integers(-5, 5, size=n), "flag": rng.integers(0, 2, size=n).astype(bool),
        "species": np.array(["emu", "cat", "dog"])[rng.integers(0, 3, size=n)],
    })
    path = tmp_path / f"t{suffix}"
    _write(frame, path)
    whole = _whole(path)
    classes, codes = np.unique(whole["species"].to_numpy(), return_inverse=True)
    table = open_table(path, "species")
    assert table.feature_names == ("a", "b", "flag")
    for batch_rows in (7, n, 10**6):
        ids, labels, class_names = table.ids_and_labels(batch_rows)
        features = np.concatenate(list(table.feature_batches(batch_rows)))
        assert ids.tobytes() == whole["example_id"].to_numpy(np.int64).tobytes()
        assert features.tobytes() == whole[["a", "b", "flag"]].to_numpy(np.float64).tobytes()
        assert labels.tobytes() == codes.astype(np.int64).tobytes() and class_names == tuple(classes)


def test_a_categorical_label_column_is_coded_by_its_values(tmp_path):
    """pandas writes a categorical as a parquet dictionary column: its classes are its values, sorted."""
    frame = pd.DataFrame({"x": np.arange(9.0), "label": pd.Categorical(["dog", "cat", "emu"] * 3,
                                                                        categories=["emu", "dog", "cat"])})
    frame.to_parquet(tmp_path / "t.parquet")
    _, labels, class_names = open_table(tmp_path / "t.parquet", "label").ids_and_labels(batch_rows=4)
    assert class_names == ("cat", "dog", "emu") and labels.tolist() == [1, 0, 2] * 3


def _positions(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every fourth row to the test split (an independent split rule, sorted positions as the caller's)."""
    rows = np.arange(len(labels))
    return rows[rows % 4 != 0], rows[rows % 4 == 0]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_prepared_table_is_split_and_standardised_as_numpy_does_it_whole(tmp_path, monkeypatch, suffix):
    monkeypatch.setenv("Z0INF_DATA_DIR", str(tmp_path / "data"))
    rng = np.random.default_rng(2)
    n = 1003
    frame = pd.DataFrame({"far": 1e6 + rng.normal(size=n), "b": rng.integers(-5, 5, size=n), "same": 3.0,
                          "label": rng.integers(0, 3, size=n)})
    path = tmp_path / f"t{suffix}"
    _write(frame, path)
    prepared = prepared_table(path, "label", _positions, {"rule": "every fourth"}, batch_rows=64)
    raw = frame[["far", "b", "same"]].to_numpy(np.float64)
    train, test = _positions(frame["label"].to_numpy())
    mean, std = raw[train].mean(axis=0), raw[train].std(axis=0)
    std[std == 0] = 1.0
    assert prepared.train_ids.tolist() == train.tolist() and prepared.test_ids.tolist() == test.tolist()
    assert prepared.train_labels.tolist() == frame["label"].to_numpy()[train].tolist()
    # float32 rounding of the standardised values; a column around 10^6 keeps its precision
    np.testing.assert_allclose(prepared.train_features, (raw[train] - mean) / std, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(prepared.test_features, (raw[test] - mean) / std, rtol=1e-6, atol=1e-6)
    standardised = (raw[train] - mean) / std
    centroids = [standardised[frame["label"].to_numpy()[train] == c].mean(axis=0) for c in range(3)]
    np.testing.assert_allclose(prepared.train_class_centroids, centroids, atol=1e-9)


def test_a_prepared_table_is_read_from_the_cache_until_its_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("Z0INF_DATA_DIR", str(tmp_path / "data"))
    path = tmp_path / "t.csv"
    pd.DataFrame({"x": np.arange(40.0), "label": np.arange(40) % 2}).to_csv(path, index=False)
    reads = []
    real_batches = table_files.TableFile.batches
    monkeypatch.setattr(table_files.TableFile, "batches",
                        lambda self, *a, **k: (reads.append(1), (yield from real_batches(self, *a, **k)))[1])
    first = prepared_table(path, "label", _positions, {})
    assert reads, "the first load reads the file"
    reads.clear()
    again = prepared_table(path, "label", _positions, {})
    assert not reads and np.array_equal(again.train_features, first.train_features)
    pd.DataFrame({"x": np.arange(40.0) ** 2, "label": np.arange(40) % 2}).to_csv(path, index=False)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed = prepared_table(path, "label", _positions, {})
    assert reads and not np.array_equal(changed.train_features, first.train_features)
    cached = next((tmp_path / "data" / "cache" / "tables").glob("*/train_features.f32"))
    cached.write_bytes(cached.read_bytes()[:-4])  # a truncated cache is named, never read as data
    with pytest.raises(InputError, match="prepared table .*train_features.f32"):
        for folder in (tmp_path / "data" / "cache" / "tables").iterdir():
            table_files._load(folder, str(path))


def _resident_bytes(file: Path) -> int:
    """Resident bytes of this process's mappings of ``file``, from the kernel's /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef" and "-" in line.split()[0]:
            inside = line.endswith(str(file))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def test_released_pages_leave_memory_until_touched_again(tmp_path, monkeypatch):
    monkeypatch.setenv("Z0INF_DATA_DIR", str(tmp_path / "data"))
    rows = 200_000
    path = tmp_path / "t.parquet"
    rng = np.random.default_rng(3)
    pq.write_table(pa.table({"x": rng.normal(size=rows), "y": rng.normal(size=rows), "label": rng.integers(0, 2, rows)}),
                   path, row_group_size=50_000)
    prepared = prepared_table(path, "label", _positions, {})
    mapped = next((tmp_path / "data" / "cache" / "tables").glob("*/train_features.f32")).resolve()
    total = float(prepared.train_features.sum(dtype=np.float64))  # touches every page
    assert _resident_bytes(mapped) >= 0.9 * mapped.stat().st_size
    release_pages()
    assert _resident_bytes(mapped) < 0.05 * mapped.stat().st_size
    assert float(prepared.train_features.sum(dtype=np.float64)) == total  # read back, unchanged


def test_a_value_that_is_not_a_number_past_the_first_block_names_the_file(tmp_path):
    """pyarrow types a CSV column from its first block; a later text value is bad input, named."""
    path = tmp_path / "late.csv"
    rows = ["x,label"] + [f"{i}.5,{i % 2}" for i in range(40_000)] + ["oops,1"]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(InputError, match="cannot be read") as info:
        list(open_table(path, "label").feature_batches())
    assert str(path) in str(info.value)


# A table prepared in a fresh process: pyarrow's peak allocation, the whole table's size in pyarrow
# and the batches of each pass (counted by wrapping the reader's batch source).
_MEASURE = """
import json, sys
from pathlib import Path
import numpy as np, pyarrow as pa, pyarrow.dataset as ds
from z0inf_pipeline.training import table_files
sizes = []
source = table_files.TableFile.batches
def counted(*args, **kwargs):
    for batch in source(*args, **kwargs):
        sizes.append(batch.num_rows)
        yield batch
table_files.TableFile.batches = counted
path = Path(sys.argv[1])
halves = lambda labels: (np.arange(0, len(labels), 2), np.arange(1, len(labels), 2))
table = table_files.prepared_table(path, "label", halves, {}, batch_rows=int(sys.argv[2]))
peak = pa.default_memory_pool().max_memory()
whole = ds.dataset(path, format=path.suffix[1:]).to_table().nbytes
print(json.dumps({"peak": peak, "whole": whole, "sizes": sizes, "rows": len(table.train_ids) + len(table.test_ids)}))
"""


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_big_table_is_read_in_batches_never_whole(tmp_path, suffix):
    rows, columns, batch_rows = 400_000, 8, 8192
    rng = np.random.default_rng(0)
    table = pa.table({**{f"x{j}": rng.normal(size=rows) for j in range(columns)}, "label": rng.integers(0, 3, rows)})
    path = tmp_path / f"big{suffix}"
    # a parquet scan holds a few row groups: groups of 10,000 rows (0.7 MB), as a 10^6-row file would have 100
    pacsv.write_csv(table, path) if suffix == ".csv" else pq.write_table(table, path, row_group_size=10_000)
    measured = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(batch_rows)],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "Z0INF_DATA_DIR": str(tmp_path / "data")})
    report = json.loads(measured.stdout)
    assert report["rows"] == rows
    # three passes (labels, the training statistics, the standardised rows), every batch at most
    # batch_rows rows, covering every row three times
    assert len(report["sizes"]) >= 3 * math.ceil(rows / batch_rows) and max(report["sizes"]) <= batch_rows
    assert sum(report["sizes"]) == 3 * rows
    # the whole table in pyarrow is 29 MB; what pyarrow held at once (about 6 MB) stayed under half of it
    assert report["peak"] < report["whole"] / 2, report
