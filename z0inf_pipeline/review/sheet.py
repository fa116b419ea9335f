"""The review sheet: one self-contained HTML file per run (styles inline, pictures as data URIs), for
people who only open MLflow, which previews HTML artifacts. It shows what the review page shows for
every flagged example, without the forms."""

from __future__ import annotations

from importlib import resources

import pandas as pd

from .cards import training_cards
from .evidence import RunEvidence
from .gate import GateStatus
from .run_review import RunReview, decisions_needed, lineage_history
from .store import DecisionStore


def review_sheet_html(
    evidence: RunEvidence,
    current: pd.DataFrame,
    history: pd.DataFrame | None = None,
    *,
    gate: GateStatus | None = None,
) -> str:
    """Render the sheet. ``current``: the run's decisions in force (``DecisionStore.current``);
    ``history``: decisions on the run and its ancestors with a ``run_id`` column (optional);
    ``gate``: the gate status to print (optional)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(
        loader=PackageLoader("z0inf_pipeline.review.web", "templates"), autoescape=select_autoescape(["html"])
    )
    css = resources.files("z0inf_pipeline.review.web").joinpath("static/review.css").read_text(encoding="utf-8")
    cards = training_cards(evidence, evidence.queue["example_id"], current, history)
    return env.get_template("sheet.html").render(
        run_id=evidence.run_id, info=evidence.info, evidence=evidence, cards=cards, css=css, gate=gate,
        needed=None if gate is None else decisions_needed(gate),
        decided=int(evidence.queue["example_id"].isin(current["example_id"]).sum()),
    )


def run_review_sheet(review: RunReview, evidence: RunEvidence, store: DecisionStore) -> str:
    """The sheet of a run as of now: the decisions in force across its lineage, their history, the gate."""
    current = review.decisions(store)
    return review_sheet_html(evidence, current, lineage_history(store, review.lineage), gate=review.gate(current))
