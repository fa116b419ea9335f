"""A run's review as files people can open straight from MLflow, whose artifact viewer previews HTML
and CSV but not parquet: the self-contained review sheet (every flagged example as on the review
page) and the queue as a readable table (flag score percentile, signal ranks, decisions), in CSV and
HTML. Pure: bytes out, the caller logs them (no MLflow here)."""

from __future__ import annotations

import html as html_lib

import pandas as pd

from ..training.layout import TEXT_COLUMNS
from .cards import decision_text
from .evidence import RunEvidence
from .run_review import RunReview
from .sheet import run_review_sheet
from .store import DecisionStore

SHEET_NAME = "review_sheet.html"
TABLE_STEM = "review_queue"
PREVIEW_ROWS = 1000


def review_artifacts(
    evidence: RunEvidence,
    store: DecisionStore,
    histogram: bytes | None = None,
    current: pd.DataFrame | None = None,
) -> dict[str, bytes]:
    """``{"review_sheet.html", "review_queue.csv", "review_queue.html": bytes}`` for the run's review
    queue in ``evidence`` (as ``build_review_queue`` made it, ``info`` as the asset writes it: policy,
    cut-off, lineage). The caller builds the evidence once and may reuse it (the asset's metadata
    table is ``reviewer_table`` of the same evidence); ``histogram``: the flag score histogram (PNG)
    made with the queue, shown at the sheet's head; ``current``: the decisions in force across the
    run's lineage (``RunReview.decisions``) when the caller has them, else asked of the store once."""
    review = RunReview(evidence.layout, evidence.queue, evidence.info)
    current = review.decisions(store) if current is None else current
    sheet = run_review_sheet(review, evidence, store, histogram, current)
    table = reviewer_table(evidence, current)
    return {SHEET_NAME: sheet.encode("utf-8"), **table_previews(table, TABLE_STEM)}


def reviewer_table(evidence: RunEvidence, current: pd.DataFrame) -> pd.DataFrame:
    """The queue as a reviewer reads it: the flag score with its percentile and rank among all training
    examples (not a raw robust z), the signals that flag the example, every signal with its rank, label
    and prediction with its probability, the loss trajectory's ends, and the decision in force (naming
    the earlier run it was made on, if any)."""
    queue = evidence.queue
    standing = evidence.flag_standing.reindex(queue["example_id"])
    decided = current.set_index("example_id").reindex(queue["example_id"])
    carried = decided.get("decided_on_run", pd.Series(None, index=decided.index))
    decision = [
        decision_text(action, label) + (f" (on run {run[:8]})" if isinstance(run, str) and run != evidence.run_id else "")
        for action, label, run in zip(decided["action"], decided["label"], carried)
    ]
    signals = {}
    for name in evidence.signal_columns:
        signals[name] = queue[name].to_numpy()
        signals[f"{name} rank"] = queue[f"{name}_rank"].to_numpy()
    return pd.DataFrame(
        {
            "rank": queue["rank"].to_numpy(),
            "example_id": queue["example_id"].to_numpy(),
            "flag_score": queue["flag_score"].to_numpy(),
            "percentile": standing["percentile"].round(1).to_numpy(),
            "rank among all": standing["rank"].astype("Int64").to_numpy(),
            "flagged_by": queue["flagged_by"].to_numpy(),
            **signals,
            "label": queue["label"].to_numpy(),
            "predicted_label": queue["predicted_label"].to_numpy(),
            "predicted_probability": queue["predicted_probability"].to_numpy(),
            "loss_first": queue["loss_first"].to_numpy(),
            "loss_last": queue["loss_last"].to_numpy(),
            "decision": decision,
            **{column: queue[column].to_numpy() for column in TEXT_COLUMNS if column in queue.columns},
        }
    )


def table_previews(frame: pd.DataFrame, stem: str, *, max_rows: int = PREVIEW_ROWS) -> dict[str, bytes]:
    """``{<stem>.csv, <stem>.html: bytes}``: the first ``max_rows`` rows, the HTML with numbers to 4
    significant digits and every cell escaped (MLflow previews both; it cannot preview parquet)."""
    shown = frame.head(max_rows)
    readable = shown.apply(lambda column: column.map(_four_digits) if pd.api.types.is_float_dtype(column) else column)
    note = f"<p>first {max_rows} of {len(frame)} rows</p>" if len(frame) > max_rows else ""
    title = html_lib.escape(stem)
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>'
        "body{font:13px system-ui,sans-serif;margin:12px}table{border-collapse:collapse}"
        "th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f3f4f6}"
        f"</style></head><body><h3>{title}</h3>{note}{readable.to_html(index=False, na_rep='', escape=True)}</body></html>"
    )
    return {f"{stem}.csv": shown.to_csv(index=False).encode("utf-8"), f"{stem}.html": page.encode("utf-8")}


def _four_digits(value) -> str:
    return "" if pd.isna(value) else f"{value:.4g}"
