"""A run's review as files people can open straight from MLflow, whose artifact viewer previews HTML
and CSV but not parquet: the self-contained review sheet (every flagged example as on the review
page) and the queue as a readable table (flag score percentile, signal ranks, decisions), in CSV and
HTML. Pure: bytes out, the caller logs them (no MLflow here)."""

from __future__ import annotations

import pandas as pd

from ..training.layout import TEXT_COLUMNS
from .cards import decision_text
from .run_review import RunReview
from .sheet import run_review_sheet, templates
from .store import DecisionStore

SHEET_NAME = "review_sheet.html"
TABLE_STEM = "review_queue"
PREVIEW_ROWS = 1000


def review_artifacts(
    review: RunReview,
    store: DecisionStore,
    histogram: bytes | None = None,
    current: pd.DataFrame | None = None,
) -> dict[str, bytes]:
    """``{"review_sheet.html", "review_queue.csv", "review_queue.html": bytes}`` for the run's review
    queue in ``review`` (as ``build_review_queue`` made it, ``info`` as the asset writes it: policy,
    cut-off, lineage). The caller builds the review once and may reuse it (the asset's metadata
    table is ``reviewer_table`` of the same review); ``histogram``: the flag score histogram (PNG)
    made with the queue, shown at the sheet's head; ``current``: the decisions in force across the
    run's lineage (``review.decisions``) when the caller has them, else asked of the store once."""
    current = review.decisions(store) if current is None else current
    sheet = run_review_sheet(review, store, histogram, current)
    table = reviewer_table(review, current)
    return {SHEET_NAME: sheet.encode("utf-8"), **table_previews(table, TABLE_STEM)}


def reviewer_table(review: RunReview, current: pd.DataFrame) -> pd.DataFrame:
    """The queue as a reviewer reads it: the flag score with its percentile and rank among all training
    examples (not a raw robust z), the signals that flag the example, every signal with its rank, label
    and prediction by the same names with its probability (a text run: its prompt and target instead),
    the loss trajectory's ends, and the decision in force (naming the earlier run it was made on, if any)."""
    queue = review.queue
    standing = review.flag_standing.reindex(queue["example_id"])
    decided = current.set_index("example_id").reindex(queue["example_id"])
    carried = decided.get("decided_on_run", pd.Series(None, index=decided.index))
    decision = [
        decision_text(action, label, review.class_names, text)
        + (f" (on run {run[:8]})" if isinstance(run, str) and run != review.run_id else "")
        for action, label, text, run in zip(decided["action"], decided["label"], decided["target_text"], carried)
    ]
    labels = {} if review.is_text else {
        "label": [review.label_name(v) for v in queue["label"]],
        "predicted_label": [review.label_name(v) for v in queue["predicted_label"]],
        "predicted_probability": queue["predicted_probability"].to_numpy(),
    }
    signals = {}
    for name in review.signal_columns:
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
            **labels,
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
    page = templates().get_template("table.html").render(
        title=stem, total=len(frame), shown=len(shown), columns=list(readable.columns),
        rows=readable.astype(object).where(readable.notna(), "").itertuples(index=False, name=None),
    )
    return {f"{stem}.csv": shown.to_csv(index=False).encode("utf-8"), f"{stem}.html": page.encode("utf-8")}


def _four_digits(value) -> str:
    return "" if pd.isna(value) else f"{value:.4g}"
