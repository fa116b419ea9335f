"""What the MLflow UI can show people: a link straight to an experiment's model-training runs (MLflow 3
opens on its GenAI view, where these runs do not appear), and small tables written also as CSV and HTML,
which the artifact viewer previews (it cannot preview parquet)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..influence.atomic import atomic_output

# MLflow 3.x UI: the runs list of an experiment in its "Model training" view (the query parameter selects
# the view; verified against the 3.17 UI, whose router reads `workflowType` = "genai" | "machine_learning").
TRAINING_RUNS_FRAGMENT = "#/experiments/{experiment_id}/runs?workflowType=machine_learning"
PREVIEW_ROWS = 1000


def training_runs_url(ui_url: str, experiment_id: str) -> str:
    """``http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning`` for ui_url and id 1."""
    return ui_url.rstrip("/") + "/" + TRAINING_RUNS_FRAGMENT.format(experiment_id=experiment_id)


def experiment_runs_url(ui_url: str, experiment: str = "z0inf", tracking_uri: str | None = None) -> str:
    """The training runs view of ``experiment`` in the store (the experiment list when it does not exist yet)."""
    from .client import tracking_client

    found = tracking_client(tracking_uri).get_experiment_by_name(experiment)
    if found is None:
        return ui_url.rstrip("/") + "/#/experiments?workflowType=machine_learning"
    return training_runs_url(ui_url, found.experiment_id)


def write_table_previews(frame: pd.DataFrame, folder: str | Path, stem: str, *, max_rows: int = PREVIEW_ROWS) -> list[Path]:
    """Write ``<stem>.csv`` and ``<stem>.html`` (first ``max_rows`` rows, numbers to 4 significant digits)
    into ``folder``, atomically; return both paths, ready to log as artifacts beside the parquet file."""
    shown = frame.head(max_rows)
    readable = shown.apply(lambda column: column.map(_four_digits) if pd.api.types.is_float_dtype(column) else column)
    note = f"<p>first {max_rows} of {len(frame)} rows</p>" if len(frame) > max_rows else ""
    html = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{stem}</title><style>'
        "body{font:13px system-ui,sans-serif;margin:12px}table{border-collapse:collapse}"
        "th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f3f4f6}"
        f"</style></head><body><h3>{stem}</h3>{note}{readable.to_html(index=False, na_rep='', escape=True)}</body></html>"
    )
    folder = Path(folder)
    paths = [folder / f"{stem}.csv", folder / f"{stem}.html"]
    with atomic_output(paths[0]) as tmp:
        shown.to_csv(tmp, index=False)
    with atomic_output(paths[1]) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return paths


def print_ui_links(ui_url: str = "http://127.0.0.1:5000") -> None:
    """Print the link to the model-training runs (``make mlflow-ui`` shows it before starting the UI)."""
    print(f"MLflow training runs: {experiment_runs_url(ui_url)}")


def _four_digits(value) -> str:
    return "" if pd.isna(value) else f"{value:.4g}"
