"""CSV and parquet datasets read in batches: the same bytes as reading the file whole with pandas (an
independent reader), and pyarrow never holding the whole table of a big file."""

from __future__ import annotations

import json
import math
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
from z0inf_pipeline.training.table_files import read_table


def _write(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path, row_group_size=13)


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
    whole = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    classes, codes = np.unique(whole["species"].to_numpy(), return_inverse=True)
    for batch_rows in (7, n, 10**6):
        ids, features, labels, class_names, _, feature_names = read_table(path, "species", batch_rows=batch_rows)
        assert feature_names == ("a", "b", "flag")
        assert ids.tobytes() == whole["example_id"].to_numpy(np.int64).tobytes()
        assert features.tobytes() == whole[["a", "b", "flag"]].to_numpy(np.float64).tobytes()
        assert labels.tobytes() == codes.astype(np.int64).tobytes() and class_names == tuple(classes)


def test_a_value_that_is_not_a_number_past_the_first_block_names_the_file(tmp_path):
    """pyarrow types a CSV column from its first block; a later text value is bad input, named."""
    path = tmp_path / "late.csv"
    rows = ["x,label"] + [f"{i}.5,{i % 2}" for i in range(40_000)] + ["oops,1"]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(InputError, match="cannot be read") as info:
        read_table(path, "label")
    assert str(path) in str(info.value)


# A run of read_table in a fresh process: pyarrow's peak allocation, the whole table's size in pyarrow
# and the batches of each pass (counted by wrapping the reader's batch source).
_MEASURE = """
import json, sys
from pathlib import Path
import pyarrow as pa, pyarrow.dataset as ds
from z0inf_pipeline.training import table_files
sizes = []
source = table_files.table_batches
def counted(*args, **kwargs):
    for batch in source(*args, **kwargs):
        sizes.append(batch.num_rows)
        yield batch
table_files.table_batches = counted
path = Path(sys.argv[1])
ids, features, *_ = table_files.read_table(path, "label", batch_rows=int(sys.argv[2]))
peak = pa.default_memory_pool().max_memory()
whole = ds.dataset(path, format=path.suffix[1:]).to_table().nbytes
print(json.dumps({"peak": peak, "whole": whole, "sizes": sizes, "rows": len(ids)}))
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
                              capture_output=True, text=True, check=True)
    report = json.loads(measured.stdout)
    assert report["rows"] == rows
    # two passes (labels, then features), every batch at most batch_rows rows, covering every row twice
    assert len(report["sizes"]) >= 2 * math.ceil(rows / batch_rows) and max(report["sizes"]) <= batch_rows
    assert sum(report["sizes"]) == 2 * rows
    # the whole table in pyarrow is 29 MB; what pyarrow held at once (about 6 MB) stayed under half of it
    assert report["peak"] < report["whole"] / 2, report
