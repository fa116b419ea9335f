"""Small helpers shared by the assets: the partition's output layout, markdown tables, quantiles."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd

from ..review import RunLayout


def layout_for(context) -> RunLayout:
    """Output folder of the partition (= MLflow run id) being materialised or checked."""
    return RunLayout.for_run(partition_key(context))


def partition_key(context) -> str:
    if isinstance(context, dg.AssetCheckExecutionContext):
        return context.op_execution_context.partition_key
    return context.partition_key


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


def markdown_table(frame: pd.DataFrame, max_rows: int = 25, floatfmt: str = ".4g") -> str:
    """A markdown table of the first rows (Dagster renders markdown metadata in the asset view)."""
    shown = frame.head(max_rows)

    def cell(value) -> str:
        if value is None or (not isinstance(value, (list, np.ndarray)) and pd.isna(value)):
            return ""
        if isinstance(value, (float, np.floating)):
            return format(float(value), floatfmt)
        return str(value)

    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    if len(frame) > max_rows:
        lines.append(f"\n{len(frame) - max_rows} more rows in the parquet file.")
    return "\n".join(lines)


def path_metadata(**paths) -> dict[str, dg.MetadataValue]:
    """``<name>_path`` entries: where each output file of the materialisation is."""
    return {f"{name}_path": dg.MetadataValue.path(str(path)) for name, path in paths.items()}
