"""Small helpers shared by assets and checks: the partition's run id, numbers and tables for people, links
to a run's GX Data Docs."""

from __future__ import annotations

import math
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from ..quality import SuiteReport


def run_id_of(context) -> str:
    """The MLflow run id the step works on: the partition key of the asset or check."""
    if isinstance(context, dg.AssetCheckExecutionContext):
        return context.op_execution_context.partition_key
    return context.partition_key


def split_ids(examples: pd.DataFrame, split: str = "train") -> np.ndarray:
    """The example ids of one split of a run's examples table (the ``training_run`` output)."""
    return examples.loc[examples["split"] == split, "example_id"].to_numpy(np.int64)


def rounded(value, digits: int = 3) -> float:
    """``value`` to ``digits`` significant digits, as a reader wants to see it (0.1002227 -> 0.1)."""
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))


def quantiles(values, prefix: str) -> dict[str, float]:
    """Median, 90th, 99th percentile and maximum: the summary logged for a score distribution."""
    values = np.asarray(values, dtype=np.float64)
    q50, q90, q99 = np.quantile(values, [0.5, 0.9, 0.99])
    return {
        f"{prefix}_q50": float(q50),
        f"{prefix}_q90": float(q90),
        f"{prefix}_q99": float(q99),
        f"{prefix}_max": float(values.max()),
    }


def rounded_metadata(values: dict[str, float], strip: str = "") -> dict[str, float]:
    """Numbers for the Dagster UI: rounded, with ``strip`` (e.g. a metric prefix) taken off the names."""
    return {k.removeprefix(strip): rounded(v) for k, v in values.items()}


def table_metadata(frame: pd.DataFrame, max_rows: int = 25) -> dg.TableMetadataValue:
    """The first rows as a Dagster table (the UI renders it as one, typed by column); floats rounded to
    three significant digits, anything else a cell cannot hold (a list, a category) as text."""
    shown = frame.head(max_rows)
    kinds = {c: "float" if pd.api.types.is_float_dtype(t) else "int" if pd.api.types.is_integer_dtype(t)
             else "bool" if pd.api.types.is_bool_dtype(t) else "string" for c, t in shown.dtypes.items()}

    def cell(value, kind: str):
        if value is None or (not isinstance(value, (list, np.ndarray)) and pd.isna(value)):
            return None
        return {"float": rounded, "int": int, "bool": bool}.get(kind, str)(value)

    records = [dg.TableRecord({str(c): cell(v, kinds[c]) for c, v in zip(shown.columns, row)})
               for row in shown.itertuples(index=False)]
    schema = dg.TableSchema(columns=[dg.TableColumn(str(c), kinds[c]) for c in shown.columns])
    return dg.MetadataValue.table(records, schema)


def gx_metadata(mlflow, run_id: str, folder: Path, *reports: SuiteReport) -> dict:
    """The path of the run's Data Docs, and a table linking each validation's page and stored result by
    its file name (the full path is the link: a path of a hundred characters would not wrap in the
    Dagster UI's metadata column); the same files (and the suite's page) are logged to the MLflow run
    under ``gx/`` (the shared styles once per run). ``folder``: the run's ``RunLayout.gx_folder``."""
    stored = [r for r in reports if r.validation_result is not None]
    if not stored:
        return {}
    mlflow.log_gx(run_id, folder, [p for r in stored for p in r.pages if p.is_file()])
    rows = [f"| {r.suite} | {file_link(r.data_docs_page)} | {file_link(r.validation_result)} |" for r in stored]
    return {
        "data_docs": dg.MetadataValue.path(str(stored[0].data_docs)),
        "gx_validations": dg.MetadataValue.md(
            "| suite | Data Docs page | stored result |\n|---|---|---|\n" + "\n".join(rows)
        ),
    }


def file_link(path) -> str:
    """A Markdown link to a stored file, shown by its name (a local path becomes a file:// URL)."""
    url = path.as_uri() if isinstance(path, Path) and path.is_absolute() else str(path)
    return f"[{path.name}]({url})"
