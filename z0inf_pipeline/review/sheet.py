"""The review sheet: one self-contained HTML file per run (styles inline, pictures as data URIs), for
people who only open MLflow, which previews HTML artifacts. It shows what the review page shows for
every flagged example, without the forms."""

from __future__ import annotations

import base64
from functools import lru_cache
from importlib import resources

import pandas as pd

from .cards import training_cards
from .gate import GateStatus
from .run_review import RunReview, decisions_needed, lineage_history
from .store import DecisionStore


@lru_cache(maxsize=1)
def templates():
    """The review page's Jinja templates (HTML escaped), for what is rendered outside the web app."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    return Environment(
        loader=PackageLoader("z0inf_pipeline.review.web", "templates"), autoescape=select_autoescape(["html"])
    )


def review_sheet_html(
    review: RunReview,
    current: pd.DataFrame,
    history: pd.DataFrame | None = None,
    *,
    gate: GateStatus | None = None,
    histogram: bytes | None = None,
) -> str:
    """Render the sheet. ``current``: the run's decisions in force (``review.decisions``);
    ``history``: decisions on the run and its ancestors with a ``run_id`` column (optional);
    ``gate``: the gate status to print (optional); ``histogram``: the flag score histogram (PNG)."""
    css = resources.files("z0inf_pipeline.review.web").joinpath("static/review.css").read_text(encoding="utf-8")
    cards = training_cards(review, review.queue["example_id"], current, history)
    return templates().get_template("sheet.html").render(
        run_id=review.run_id, info=review.info, review=review, cards=cards, css=css, gate=gate,
        needed=None if gate is None else decisions_needed(gate),
        decided=int(review.queue["example_id"].isin(current["example_id"]).sum()),
        histogram=None if histogram is None else "data:image/png;base64," + base64.b64encode(histogram).decode("ascii"),
    )


def run_review_sheet(
    review: RunReview,
    store: DecisionStore,
    histogram: bytes | None = None,
    current: pd.DataFrame | None = None,
) -> str:
    """The sheet of a run as of now: the decisions in force across its lineage (``current`` when the
    caller already has them, else asked of the store), their history, the gate."""
    current = review.decisions(store) if current is None else current
    history = lineage_history(store, review.lineage)
    return review_sheet_html(review, current, history, gate=review.gate(current), histogram=histogram)


def stored_histogram(review: RunReview) -> bytes | None:
    """The flag score histogram written with the run's review queue, if there is one."""
    path = review.layout.histogram
    return path.read_bytes() if path.exists() else None
