"""``z0inf review list | decide | serve | sheet``: read a run's review queue, record decisions in the durable
store (on the command line or on the review page), write the self-contained review sheet."""

from __future__ import annotations

import argparse
import secrets
import socket
import sys

import numpy as np
import pandas as pd

from ..errors import ConfigurationError, ReviewError, Z0infError
from ..influence.signals import SIGNAL_COLUMNS
from ..review import ACTIONS, DecisionStore, FlagPolicy
from ..review.cards import decision_effect, decision_text
from ..review.gate import POLICY_CHANGES_KEY
from ..review.layout import outputs_base
from ..review.run_review import RunReview, runs_with_queue

_SPARKS = "▁▂▃▄▅▆▇█"


def register(sub: argparse._SubParsersAction) -> None:
    review = sub.add_parser("review", help="review flagged training examples (list the queue, record decisions)")
    commands = review.add_subparsers(dest="review_command", required=True, metavar="ACTION")

    listing = commands.add_parser("list", help="runs with a review queue, or one run's queue")
    listing.add_argument("--run", help="MLflow run id: show its queue (default: a summary of every run)")
    listing.add_argument("--pending", action="store_true", help="only flagged examples without a decision")
    listing.add_argument("--limit", type=int, default=50, help="rows to show (default: %(default)s; 0 = all)")
    listing.set_defaults(handler=_list)

    decide = commands.add_parser(
        "decide", help="record a decision (keep, drop, relabel; edit_target on a text run) for examples of a run"
    )
    decide.add_argument("run", help="MLflow run id")
    decide.add_argument("ids", nargs="*", type=int, metavar="ID", help="training example ids")
    decide.add_argument("--flagged", action="store_true", help="also every flagged example still without a decision")
    decide.add_argument("--action", choices=ACTIONS, required=True)
    decide.add_argument("--label", help="the new label (with --action relabel): a class name, e.g. versicolor, or its index")
    decide.add_argument("--target", metavar="TEXT",
                        help="the new target answer of a text run's example (with --action edit_target), e.g. bcdef")
    decide.add_argument("--reviewer", help="who decided (default: the login name)")
    decide.add_argument("--note", help="free text kept with the decision")
    decide.set_defaults(handler=_decide)

    serve = commands.add_parser("serve", help="the review page: see flagged examples and decide in a browser")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    serve.add_argument("--port", type=int, default=8765, help="(default: %(default)s)")
    serve.add_argument(
        "--token",
        help="access token: the page answers 401 unless opened once with ?token=T (then a cookie) or sent "
        "header X-Z0inf-Token (required when --host is not a loopback address: then at least "
        f"{MIN_PUBLIC_TOKEN_CHARS} characters, not only whitespace)",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the page is reached by (e.g. review.example.org); repeatable. Requests whose Host "
        "header names anything else than these, the bound address and this machine's loopback names are "
        "refused (DNS rebinding)",
    )
    serve.add_argument("--run", help="MLflow run id: print the link straight to its review")
    serve.set_defaults(handler=_serve)

    sheet = commands.add_parser("sheet", help="write a run's self-contained HTML review sheet")
    sheet.add_argument("run", help="MLflow run id")
    sheet.add_argument("-o", "--output", required=True, help="the .html file to write")
    sheet.set_defaults(handler=_sheet)


def _list(args) -> None:
    store = DecisionStore.open()
    if args.run is None:
        _summary(store, outputs_base())
        return
    review = RunReview.open(args.run, outputs_base(), train_config=_train_config(args.run))
    queue, info = review.queue, review.info
    current = review.decisions(store)
    status = review.gate(current)
    current = current.set_index("example_id")
    queue["decision"] = [_describe(review, current, i) for i in queue["example_id"]]
    if args.pending:
        queue = queue[queue["decision"] == ""]
    shown = queue if args.limit == 0 else queue.head(args.limit)
    table = pd.DataFrame(
        {
            "rank": shown["rank"],
            "id": shown["example_id"],
            "flag score": shown["flag_score"].map(lambda v: f"{v:.4g}"),
            "ranks SI/var/mean/final/conf/variab.": shown[[f"{c}_rank" for c in SIGNAL_COLUMNS]]
            .astype("string").fillna("-").agg("/".join, axis=1),
            "flagged by": shown["flagged_by"],
            # a text run's examples are its prompt and target; a classification run's label and prediction by name
            **({c: shown[c] for c in ("prompt", "target") if c in shown} if review.is_text else {
                "label": [review.label_name(v) for v in shown["label"]],
                "predicted": [review.label_name(v) or "?" for v in shown["predicted_label"]],
            }),
            "loss (first..last)": [_sparkline(t) for t in shown["loss_trajectory"]],
            "decision": shown["decision"],
        }
    )
    print(
        f"run {review.run_name} ({args.run}): {len(queue)} {'pending ' if args.pending else ''}flagged example(s); policy "
        f"{review.policy.method} on {review.policy.score} (cut-off {info['cutoff']:.4g}); "
        f"decisions in {store.location}"
    )
    if len(table):
        print(table.to_string(index=False))
    if len(shown) < len(queue):
        print(f"... {len(queue) - len(shown)} more (--limit 0 shows all)")
    for change in info.get(POLICY_CHANGES_KEY) or []:
        print(f"flag policy changed by {change['by']} at {change['at']}: {change['changed']} (queue rebuilt)")
    print(status.message())


def _decide(args) -> None:
    needs_recipe = args.label is not None or args.target is not None  # class names; a target's letters
    review = RunReview.open(args.run, outputs_base(), train_config=_train_config(args.run) if needs_recipe else None)
    label = review.label_index(args.label)
    store = DecisionStore.open()
    ids = set(args.ids)
    if args.flagged:
        decided = set(review.decisions(store)["example_id"].tolist())
        ids |= {int(i) for i in review.queue["example_id"] if int(i) not in decided}
    if not ids:
        raise ReviewError("review decide: give example ids, or --flagged for every undecided flagged example")
    count = review.record(store, ids, args.action, label=label, target_text=args.target, reviewer=args.reviewer,
                          note=args.note)
    print(f"recorded {decision_text(args.action, label, review.class_names, args.target)} for {count} example(s) of run "
          f"{review.run_name} ({args.run}) in {store.location}")
    print(review.gate(review.decisions(store)).message())


def _summary(store: DecisionStore, base) -> None:
    rows, broken = [], {}
    for run_id in runs_with_queue(base):
        try:
            review = RunReview.open(run_id, base)
        except Z0infError as exc:  # one unreadable queue does not hide the others
            broken[run_id] = str(exc)
            continue
        status = review.gate(review.decisions(store))
        rows.append(
            {
                "run": review.run_name,
                "id": run_id,
                "flagged": status.flagged,
                "decided": status.reviewed,
                "pending": status.unreviewed,
                "gate": "open" if status.passed else "BLOCKED",
            }
        )
    if not rows and not broken:
        print(f"no review queues under {base / 'runs'} yet (materialise a run's review_queue, e.g. `z0inf demo`)")
        return
    if rows:
        print(pd.DataFrame(rows).to_string(index=False))
    for run_id, reason in broken.items():
        print(f"run {run_id}: left out: {reason}")


def _describe(review: RunReview, current: pd.DataFrame, example_id: int) -> str:
    """The decision in force; one inherited from an earlier round names the run it was made on."""
    if example_id not in current.index:
        return ""
    row = current.loc[example_id]
    action = decision_text(row["action"], row["label"], review.class_names, row.get("target_text"))
    decided_on = row.get("decided_on_run")
    carried = "" if decided_on in (None, review.run_id) else f" (decided on run {decided_on[:8]})"
    return f"{action}{carried}; {decision_effect(row.get('applied_in'))}"


def _sparkline(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    low, high = values.min(), values.max()
    scaled = (
        np.zeros(len(values), dtype=int) if high == low else ((values - low) / (high - low) * 7).round().astype(int)
    )
    return f"{values[0]:.3g} {''.join(_SPARKS[i] for i in scaled)} {values[-1]:.3g}"


_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_WILDCARD = ("0.0.0.0", "::", "")
MIN_PUBLIC_TOKEN_CHARS = 16


def _check_token(host: str, token: str | None) -> None:
    """Off loopback the token is all that guards the page: refuse none, a short one or whitespace, and
    offer a strong one."""
    if host in _LOOPBACK:
        if token is not None and not token.strip():
            raise ConfigurationError("review serve: --token is only whitespace; give a real token or none")
        return
    offer = f"for example --token {secrets.token_urlsafe(24)}"
    if token is None:
        raise ConfigurationError(f"review serve: --host {host} exposes the page beyond this machine; give --token as "
                                 f"well ({offer})")
    if not token.strip() or len(token.strip()) < MIN_PUBLIC_TOKEN_CHARS:
        raise ConfigurationError(
            f"review serve: --host {host} needs a token of at least {MIN_PUBLIC_TOKEN_CHARS} characters that is not "
            f"only whitespace; this one has {len(token.strip())} ({offer})"
        )


def _allowed_hosts(host: str, extra: list[str]) -> frozenset[str]:
    """The host names requests may carry: loopback names, the bound address (or, bound to every address,
    this machine's names) and those given with --allowed-host."""
    from ..review.web.app import LOOPBACK_NAMES

    names = set(LOOPBACK_NAMES) | {n.strip().lower() for n in extra if n.strip()}
    if host in _WILDCARD:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    else:
        names.add(host.strip("[]").lower())
    return frozenset(names)


def _serve(args) -> None:
    import waitress

    from ..review.web.app import MAX_REQUEST_BYTES, ReviewSite, create_app

    _check_token(args.host, args.token)
    base = outputs_base()
    if args.run is not None:
        RunReview.open(args.run, base)  # a clear error now rather than a 404 later
    site = ReviewSite(DecisionStore.open(), base, token=args.token, train_config_for=_train_config,
                      retrain=lambda run_id, policy: _retrain_and_analyse(run_id, policy, base),
                      allowed_hosts=_allowed_hosts(args.host, args.allowed_host))
    try:
        # waitress refuses bodies far over the page's own limit before Flask reads them
        server = waitress.create_server(create_app(site), host=args.host, port=args.port, threads=8,
                                        ident="z0inf-review", max_request_body_size=4 * MAX_REQUEST_BYTES)
    except OSError as exc:
        raise ConfigurationError(f"review serve: cannot listen on {args.host}:{args.port} ({exc.strerror})") from None
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{args.port}/" + (f"runs/{args.run}" if args.run else "")
    print(f"review page: {url}{'?token=' + args.token if args.token else ''}")
    print(f"decisions go to {site.store.location}; Ctrl-C stops the server", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        print("review page stopped")
    finally:
        server.close()


def _sheet(args) -> None:
    from ..influence.atomic import atomic_output
    from ..review.sheet import run_review_sheet, stored_histogram

    review = RunReview.open(args.run, outputs_base(), train_config=_train_config(args.run))
    html = run_review_sheet(review, DecisionStore.open(), stored_histogram(review))
    with atomic_output(args.output) as tmp:
        tmp.write_text(html, encoding="utf-8")
    print(f"wrote the review sheet of run {args.run} ({len(review.queue)} flagged examples) to {args.output}")


def _retrain_and_analyse(run_id: str, policy: FlagPolicy, base) -> tuple[str | None, str]:
    """The page's retrain button: the gated ``retrain_job`` for ``run_id``, then ``influence_job`` for the
    retrained run, both with the flag policy the queue was built by, in this process on the DAGSTER_HOME
    instance (as ``z0inf materialize``). Returns (retrained run id or None, what happened)."""
    from ..review import RunLayout
    from .jobs import dagster_instance, policy_run_config, run_job

    config = policy_run_config(policy)
    instance, persistent = dagster_instance()
    # without DAGSTER_HOME the jobs run on a throwaway instance: the Dagster UI would never show them
    unkept = "" if persistent else " (DAGSTER_HOME is not set: the Dagster UI keeps no record of this; `make review` sets it)"
    outcome = run_job(instance, "retrain_job", run_id, config)
    if outcome.check_failed("review_gate"):
        return None, f"retraining did not run: {outcome.checks['review_gate'][1]}"
    if not outcome.success:
        return None, "retrain_job failed: " + "; ".join(outcome.failures) + unkept
    child = str(pd.read_parquet(RunLayout.for_run(run_id, base).retrained)["retrained_run_id"].iloc[0])
    analysed = run_job(instance, "influence_job", child, config)
    if not analysed.success:
        return child, f"retrained into {child}, but its influence_job failed: " + "; ".join(analysed.failures) + unkept
    return child, f"retrained run {run_id} into {child} and analysed it: this is its review queue" + unkept


def _train_config(run_id: str) -> dict | None:
    """The run's training recipe from its validated MLflow copy (cached after the first fetch), to draw its
    examples; None when it cannot be had, and the page then shows examples without pictures."""
    from ..tracking import fetch_run

    try:
        return fetch_run(run_id).train_config
    except Exception as exc:  # noqa: BLE001 - pictures are optional: any failure only loses them, said once here
        print(f"z0inf review: run {run_id}: no pictures ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None
