"""The review page: a small server-rendered Flask app over the review queues and the decision store.

Every page works without JavaScript (plain links and POST forms, redirect after each decision); an
inline script adds keyboard shortcuts. Decisions go through ``RunReview.record``, the same check
the CLI uses, into the append-only ``DecisionStore``, so reviewers deciding at once lose nothing.
A run is retrained once per round: its page then shows the retrained run, and a second retrain
needs an explicit request (``again``).
"""

from __future__ import annotations

import hmac
import math
import re
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlencode, urlsplit

import numpy as np
import pandas as pd
from flask import Flask, abort, flash, redirect, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ...errors import InputError, ReviewError, Z0infError
from ..cards import ATTRIBUTION_ACCURACY, decision_text, test_example_cards, training_cards
from ..evidence import sparkline, split_names
from ..layout import RunLayout
from ..policy import FlagPolicy
from ..run_review import RunReview, decisions_needed, lineage_history, runs_with_queue
from ..sheet import run_review_sheet, stored_histogram
from ..store import MAX_NOTE_CHARS, MAX_REVIEWER_CHARS, DecisionStore

PAGE_SIZE = 100
TESTS_SHOWN = 200
TOKEN_COOKIE = "z0inf_review_token"
TOKEN_HEADER = "X-Z0inf-Token"
REVIEWER_COOKIE = "z0inf_reviewer"
_YEAR_S = 365 * 24 * 3600
# The suite's tables in a source checkout (the attribution line on cards links here).
ACCURACY_TABLE = Path(__file__).resolve().parents[3] / "benchmarks" / "README.md"
# Limits: every form of the page is far below them. A larger body is refused (413) before it is read.
MAX_REQUEST_BYTES = 64 * 1024
# Wrong access tokens: after this many from one address within the window, it gets 429 until the window passes.
WRONG_TOKEN_LIMIT = 10
WRONG_TOKEN_WINDOW_S = 60.0
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass
class ReviewSite:
    """What the app serves: where runs live, the store, an optional access token, and how to find a
    run's training recipe (to draw its examples)."""

    store: DecisionStore
    base: Path  # the outputs base (``review.layout.outputs_base``), resolved by whoever serves the page
    token: str | None = None
    # host names (no port) a request's Host header may carry: the bound address, the names given with
    # --allowed-host, and this machine's loopback names; anything else is refused (DNS rebinding)
    allowed_hosts: frozenset[str] = LOOPBACK_NAMES
    train_config_for: Callable[[str], dict | None] = lambda run_id: None
    # runs the gated retrain of a run and analyses the retrained run: (retrained run id or None, message);
    # None hides the page's retrain button (the page then only shows the command)
    retrain: Callable[[str, FlagPolicy], tuple[str | None, str]] | None = None
    _reviews: dict[str, tuple[int, RunReview]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _retraining: threading.Lock = field(default_factory=threading.Lock)
    _wrong_tokens: dict[str, deque] = field(default_factory=lambda: defaultdict(deque))

    def too_many_wrong_tokens(self, address: str, *, wrong: bool) -> bool:
        """Count a wrong token from ``address`` (when ``wrong``); True while it has sent too many lately."""
        now = time.monotonic()
        with self._lock:
            recent = self._wrong_tokens[address]
            while recent and now - recent[0] > WRONG_TOKEN_WINDOW_S:
                recent.popleft()
            if wrong:
                recent.append(now)
            return len(recent) >= WRONG_TOKEN_LIMIT

    def review(self, run_id: str) -> RunReview:
        """The run under review, loaded once per materialisation of its queue (its evidence is cached
        with it; decisions are always read from the store)."""
        missing = f"run {run_id}: no review queue (materialise its review_queue first)"
        try:
            stamp = RunLayout.for_run(run_id, self.base).review_queue.stat().st_mtime_ns
        except (InputError, OSError):
            abort(404, missing)
        with self._lock:
            cached = self._reviews.get(run_id)
            if cached is None or cached[0] != stamp:
                # a queue that is there but unreadable is a named error: the error page says which file
                review = RunReview.open(run_id, self.base, self.train_config_for(run_id))
                cached = self._reviews[run_id] = (stamp, review)
            return cached[1]

    def readable_reviews(self) -> tuple[dict[str, RunReview], dict[str, str]]:
        """Every run with a queue that can be read, and why each of the others cannot (one broken run
        does not hide the rest)."""
        reviews, broken = {}, {}
        for run_id in runs_with_queue(self.base):
            try:
                reviews[run_id] = self.review(run_id)
            except Z0infError as exc:
                broken[run_id] = str(exc)
        return reviews, broken

    def children(self, run_id: str, reviews: dict[str, RunReview] | None = None) -> list[RunReview]:
        """The analysed runs retrained from ``run_id`` (by the lineage their queue records), oldest name first."""
        reviews = reviews or self.readable_reviews()[0]
        return sorted((r for r in reviews.values() if r.lineage[1:2] == [run_id]), key=lambda r: r.run_name)


def create_app(site: ReviewSite) -> Flask:
    app = Flask(__name__)
    app.secret_key = secrets.token_bytes(32)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    csrf_token = secrets.token_urlsafe(24)

    @app.context_processor
    def _common():
        return {"csrf": csrf_token, "reviewer": request.cookies.get(REVIEWER_COOKIE, ""),
                "attribution": ATTRIBUTION_ACCURACY}

    @app.get("/accuracy")
    def accuracy():
        """The suite's tables (benchmarks/README.md of this checkout), where the attribution line links."""
        if not ACCURACY_TABLE.is_file():
            abort(404, "benchmarks/README.md is not in this installation")
        return ACCURACY_TABLE.read_text(), 200, {"Content-Type": "text/plain; charset=utf-8"}

    @app.before_request
    def _guard():
        host = _host_name(request.host)
        if host not in site.allowed_hosts:
            return (f"refused: this review page does not serve the host name {host!r} (it serves "
                    f"{', '.join(sorted(site.allowed_hosts))}; start it with --allowed-host {host} to add it)"), 421
        if site.token is not None:
            address = request.remote_addr or "?"
            if site.too_many_wrong_tokens(address, wrong=False):
                return "too many wrong access tokens from this address: wait a minute", 429, {
                    "Retry-After": str(int(WRONG_TOKEN_WINDOW_S))}
            given = request.args.get("token")
            if given is not None and not hmac.compare_digest(given.encode(), site.token.encode()):
                site.too_many_wrong_tokens(address, wrong=True)
                return "access token required: this one is wrong (use the link `z0inf review serve` printed)", 401
            if given is not None:
                query = {k: v for k, v in request.args.items() if k != "token"}
                response = redirect(request.path + (f"?{urlencode(query)}" if query else ""), 303)
                response.set_cookie(TOKEN_COOKIE, site.token, httponly=True, samesite="Strict", max_age=_YEAR_S)
                return response
            presented = request.headers.get(TOKEN_HEADER) or request.cookies.get(TOKEN_COOKIE) or ""
            if not hmac.compare_digest(presented.encode(), site.token.encode()):
                if presented:
                    site.too_many_wrong_tokens(address, wrong=True)
                return "access token required: open the link with ?token=... printed by `z0inf review serve`", 401
        if request.method == "POST":
            origin = request.headers.get("Origin") or request.headers.get("Referer")
            if origin and urlsplit(origin).netloc != request.host:
                return f"refused: a form posted from {origin} to {request.host}", 403
            if not hmac.compare_digest(request.form.get("csrf", ""), csrf_token):
                return "refused: the form is stale or not from this page; reload the page", 403

    @app.get("/")
    def index():
        reviews, broken = site.readable_reviews()
        for run_id, reason in broken.items():
            flash(f"run {run_id} is left out: {reason}", "error")
        rows = []
        for run_id, review in reviews.items():
            parent = review.lineage[1] if len(review.lineage) > 1 else None
            rows.append({"review": review, "status": review.gate(review.decisions(site.store)),
                         "parent": reviews.get(parent), "parent_id": parent,
                         "children": site.children(run_id, reviews), "round": len(review.lineage) - 1})
        return render_template("index.html", rows=rows)

    @app.get("/runs/<run_id>")
    def run_page(run_id: str):
        review = site.review(run_id)
        current = review.decisions(site.store)
        status = review.gate(current)
        filters = _filters(request.args, review)
        ordered = _ordered_ids(review, current, filters)
        pages = max(1, math.ceil(len(ordered) / PAGE_SIZE))
        page = min(max(1, _int(request.args.get("page"), 1)), pages)
        shown = ordered[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        history = lineage_history(site.store, review.lineage)
        cards = training_cards(review, shown, current, history)
        parent = review.lineage[1] if len(review.lineage) > 1 else None
        return render_template(
            "run.html",
            run_id=run_id,
            info=review.info,
            review=review,
            out_of_date=review.out_of_date(),
            parent=_name_of(site, parent),
            status=status,
            needed=decisions_needed(status),
            cards=cards,
            filters=filters,
            query=_query(filters),
            page=page,
            pages=pages,
            matching=len(ordered),
            lineage=review.lineage,
            histogram=review.layout.histogram.exists(),
            retrained=_retrained(review),
            promotion=_promotion(review),
            children=site.children(run_id),
            can_retrain=site.retrain is not None,
            hidden=_hidden(filters),
        )

    @app.post("/runs/<run_id>/decide")
    def decide(run_id: str):
        review = site.review(run_id)
        form = request.form
        reviewer = (form.get("reviewer") or "").strip()
        ids = [_int(v, None) for v in form.getlist("example_id")]
        action = form.get("action", "")
        back = _filters(form, review)
        note = (form.get("note") or "").strip() or None
        if note is not None and len(note) > MAX_NOTE_CHARS:
            return (f"refused: the note has {len(note)} characters; at most {MAX_NOTE_CHARS} are kept "
                    "(go back and shorten it)"), 400
        if len(reviewer) > MAX_REVIEWER_CHARS:
            return f"refused: the reviewer name has {len(reviewer)} characters; at most {MAX_REVIEWER_CHARS}", 400
        try:
            # the class picker is in every form of a classification run: its value only counts for a relabel
            label = review.label_index(form.get("label")) if action == "relabel" and form.get("label") else None
            # likewise a text run's target field: its text only counts for an edit
            target_text = form.get("target_text") if action == "edit_target" else None
            if not reviewer:
                raise InputError("review decide: give your name as reviewer (it is kept with the decision)")
            if None in ids:
                raise InputError(f"review decide: example ids {form.getlist('example_id')} must be integers")
            review.record(site.store, ids, action, label=label, target_text=target_text, reviewer=reviewer, note=note)
        except (InputError, ReviewError) as exc:
            flash(str(exc), "error")
            anchor = ids[0] if ids and ids[0] is not None else None
            return redirect(_run_url(site, review, back, anchor), 303)
        flash(f"#{', #'.join(map(str, ids))}: {decision_text(action, label, review.class_names, target_text)} "
              f"(by {reviewer})", "ok")
        follow = form.get("then", "")
        if re.fullmatch(rf"/runs/{re.escape(run_id)}/tests/-?\d+", follow):
            target = follow
        else:
            target = _run_url(site, review, back, _next_pending(site, review, back, ids[-1]))
        response = redirect(target, 303)
        response.set_cookie(REVIEWER_COOKIE, reviewer, samesite="Strict", max_age=_YEAR_S)
        return response

    @app.post("/runs/<run_id>/retrain")
    def retrain(run_id: str):
        review = site.review(run_id)
        if site.retrain is None:
            abort(404, "this server does not run retrains; use `z0inf materialize retrain --run RUN`")
        done = _retrained(review)
        if done is not None and request.form.get("again") != "1":
            child = str(done["retrained_run_id"])
            flash(f"run {review.run_name} was already retrained into {_name_of(site, child)['name']}: this round has its "
                  "child; ask for a second retrain explicitly ('retrain again') if you mean it", "error")
            return redirect(f"/runs/{child}" if child in runs_with_queue(site.base) else f"/runs/{run_id}", 303)
        if not site._retraining.acquire(blocking=False):
            flash("a retrain is already running on this server; try again when it has finished", "error")
            return redirect(f"/runs/{run_id}", 303)
        try:
            child, message = site.retrain(run_id, review.policy)
        finally:
            site._retraining.release()
        flash(message, "ok" if child else "error")
        target = f"/runs/{child}" if child and child in runs_with_queue(site.base) else f"/runs/{run_id}"
        return redirect(target, 303)

    @app.post("/reviewer")
    def set_reviewer():
        response = redirect(_local(request.form.get("then", "/")), 303)
        response.set_cookie(REVIEWER_COOKIE, (request.form.get("reviewer") or "").strip(), samesite="Strict",
                            max_age=_YEAR_S)
        return response

    @app.get("/runs/<run_id>/tests")
    def test_list(run_id: str):
        review = site.review(run_id)
        wrong = review.wrong_tests()
        cards = None if wrong is None else test_example_cards(review, wrong["example_id"].head(TESTS_SHOWN))
        return render_template("tests.html", run_id=run_id, review=review, cards=cards,
                               total=0 if wrong is None else len(wrong), tests=review.test_count)

    @app.get("/runs/<run_id>/tests/<int(signed=True):test_id>")
    def test_view(run_id: str, test_id: int):
        review = site.review(run_id)
        try:
            proponents, opponents = review.neighbours(test_id)
        except InputError as exc:
            abort(404, str(exc))
        current = review.decisions(site.store)
        history = lineage_history(site.store, review.lineage)
        test_card = test_example_cards(review, [test_id])[0]
        return render_template(
            "test.html",
            run_id=run_id,
            review=review,
            test=test_card,
            spark=sparkline(review.loss_trajectories([test_id], split="test")[test_id]),
            proponents=training_cards(review, proponents["example_id"], current, history,
                                      dict(zip(proponents["example_id"], proponents["score"]))),
            opponents=training_cards(review, opponents["example_id"], current, history,
                                     dict(zip(opponents["example_id"], opponents["score"]))),
            filters={},
            query="",
        )

    @app.get("/runs/<run_id>/flag_score_histogram.png")
    def histogram(run_id: str):
        picture = stored_histogram(site.review(run_id))
        if picture is None:
            abort(404, f"run {run_id}: no flag score histogram")
        return picture, 200, {"Content-Type": "image/png"}

    @app.get("/runs/<run_id>/sheet.html")
    def sheet(run_id: str):
        review = site.review(run_id)
        html = run_review_sheet(review, site.store, stored_histogram(review))
        return html, 200, {"Content-Type": "text/html; charset=utf-8",
                           "Content-Disposition": f'attachment; filename="review-{run_id}.html"'}

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_exc):
        return f"refused: the request is larger than {MAX_REQUEST_BYTES // 1024} KiB (no form of this page is)", 413

    @app.errorhandler(Z0infError)
    def _named_error(exc):
        """What broke and what to do, as a page; the next request tries again (the store reconnects)."""
        return render_template("error.html", title="This page cannot be shown right now", message=str(exc)), 503

    @app.errorhandler(Exception)
    def _unexpected(exc):
        if isinstance(exc, HTTPException):
            return exc
        app.logger.exception("review page: unexpected error")
        return render_template(
            "error.html", title="Something broke on the review server",
            message=f"{type(exc).__name__}: {exc}. The server log has the details; nothing was recorded by this request.",
        ), 500

    @app.after_request
    def _headers(response):
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    return app


def _filters(args, review: RunReview) -> dict:
    """pending: only undecided; cls: only this label (classification runs); signal: most suspicious by
    this signal first, and only the examples it flags on its own when it flags any."""
    signal = args.get("signal", "")
    valid_signals = set(review.signal_columns)
    return {
        "pending": args.get("pending", "") in ("1", "on", "true"),
        "cls": None if review.is_text else _int(args.get("cls"), None),
        "signal": signal if signal in valid_signals else "",
    }


def _query(filters: dict, **extra) -> str:
    pairs = {"pending": "1" if filters.get("pending") else None, "cls": filters.get("cls"),
             "signal": filters.get("signal") or None, **extra}
    return urlencode({k: v for k, v in pairs.items() if v is not None})


def _ordered_ids(review: RunReview, current: pd.DataFrame, filters: dict, *, pending: bool | None = None) -> list[int]:
    queue = review.queue
    keep = np.ones(len(queue), dtype=bool)
    if filters["pending"] if pending is None else pending:
        keep &= ~queue["example_id"].isin(current["example_id"]).to_numpy()
    if filters["cls"] is not None:
        keep &= (queue["label"] == filters["cls"]).to_numpy()
    shown = queue[keep]
    signal = filters["signal"]
    if signal in review.flag_signal_names:
        shown = shown[[signal in split_names(v) for v in shown["flagged_by"]]]
    if signal:  # its rank, not its value: confidence is suspicious when low
        shown = shown.sort_values(f"{signal}_rank", kind="stable")
    return [int(i) for i in shown["example_id"]]


def _next_pending(site: ReviewSite, review: RunReview, filters: dict, after: int | None) -> int | None:
    """The first undecided example after ``after`` in the page's order (wrapping round), so the
    reviewer lands on the next one to decide."""
    current = review.decisions(site.store)
    order = _ordered_ids(review, current, filters, pending=False)
    pending = set(_ordered_ids(review, current, filters, pending=True))
    start = order.index(after) + 1 if after in order else 0
    for i in order[start:] + order[:start]:
        if i in pending:
            return i
    return None


def _run_url(site: ReviewSite, review: RunReview, filters: dict, anchor: int | None) -> str:
    """The run page with the same filters, on the page that holds ``anchor``, scrolled to it."""
    order = _ordered_ids(review, review.decisions(site.store), filters)
    page = order.index(anchor) // PAGE_SIZE + 1 if anchor in order else 1
    query = _query(filters, page=page if page > 1 else None)
    url = f"/runs/{review.run_id}" + (f"?{query}" if query else "")
    return url + (f"#ex-{anchor}" if anchor is not None else "")


def _hidden(filters: dict) -> dict[str, str]:
    """The filters as hidden form fields, so a decision returns to the same view."""
    return {
        "pending": "1" if filters["pending"] else "",
        "cls": "" if filters["cls"] is None else str(filters["cls"]),
        "signal": filters["signal"],
    }


def _name_of(site: ReviewSite, run_id: str | None) -> dict | None:
    """A run as links show it: its name where its queue is here (else the id's start), and its id."""
    if run_id is None:
        return None
    known = run_id in runs_with_queue(site.base)
    return {"id": run_id, "name": site.review(run_id).run_name if known else run_id[:8], "has_queue": known}


def _retrained(review: RunReview) -> dict | None:
    path = review.layout.retrained
    if not path.exists():
        return None
    return pd.read_parquet(path).iloc[0].to_dict()


def _promotion(review: RunReview) -> dict | None:
    """Where the retrained model went in the MLflow Model Registry (``model_promotion``'s summary)."""
    path = review.layout.promotion
    if not path.exists():
        return None
    return pd.read_parquet(path).iloc[0].to_dict()


_LOCAL_PATH = re.compile(r"/(?![/\\])[\x21-\x7e]*")


def _local(target: str) -> str:
    """Only redirect within this site: a path of printable ASCII without spaces, tabs or backslashes
    (browsers drop tabs and newlines and read a backslash as a slash, so '/\t/evil' would be '//evil')."""
    return target if _LOCAL_PATH.fullmatch(target) and "\\" not in target else "/"


def _host_name(host: str) -> str:
    """The name of a Host header, lowercased, without its port: 'Example.org:8765' -> 'example.org',
    '[::1]:8765' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _int(value, default):
    try:
        return int(value)
    except (TypeError, ValueError):
        return default
