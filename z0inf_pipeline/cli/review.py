"""``z0inf review list | decide``: read a run's review queue and record decisions in the durable store."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from ..errors import ReviewError
from ..influence.signals import SIGNAL_COLUMNS
from ..review import ACTIONS, DecisionStore, RunLayout, evaluate_gate, lineage_decisions, read_review_queue
from ..settings import data_dir

_SPARKS = "▁▂▃▄▅▆▇█"


def register(sub: argparse._SubParsersAction) -> None:
    review = sub.add_parser("review", help="review flagged training examples (list the queue, record decisions)")
    commands = review.add_subparsers(dest="review_command", required=True, metavar="ACTION")

    listing = commands.add_parser("list", help="runs with a review queue, or one run's queue")
    listing.add_argument("--run", help="MLflow run id: show its queue (default: a summary of every run)")
    listing.add_argument("--pending", action="store_true", help="only flagged examples without a decision")
    listing.add_argument("--limit", type=int, default=50, help="rows to show (default: %(default)s; 0 = all)")
    listing.set_defaults(handler=_list)

    decide = commands.add_parser("decide", help="record a decision (keep, drop, relabel) for examples of a run")
    decide.add_argument("run", help="MLflow run id")
    decide.add_argument("ids", nargs="*", type=int, metavar="ID", help="training example ids")
    decide.add_argument("--flagged", action="store_true", help="also every flagged example still without a decision")
    decide.add_argument("--action", choices=ACTIONS, required=True)
    decide.add_argument("--label", type=int, help="the new label (with --action relabel)")
    decide.add_argument("--reviewer", help="who decided (default: the login name)")
    decide.add_argument("--note", help="free text kept with the decision")
    decide.set_defaults(handler=_decide)


def _list(args) -> None:
    store = DecisionStore.open()
    if args.run is None:
        _summary(store)
        return
    layout = RunLayout.for_run(args.run)
    queue, info = read_review_queue(layout.review_queue)
    current = lineage_decisions(store, args.run, info).set_index("example_id")
    queue["decision"] = [_describe(current, i, args.run) for i in queue["example_id"]]
    status = _gate(queue, info, current)
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
            "label": shown["label"],
            "predicted": shown["predicted_label"].astype("string").fillna("?"),
            "loss (first..last)": [_sparkline(t) for t in shown["loss_trajectory"]],
            "decision": shown["decision"],
        }
    )
    policy = info["policy"]
    print(
        f"run {args.run}: {len(queue)} {'pending ' if args.pending else ''}flagged example(s); policy "
        f"{policy['method']} on {policy.get('score', 'self_influence')} (cut-off {info['cutoff']:.4g}); "
        f"decisions in {store.location}"
    )
    if len(table):
        print(table.to_string(index=False))
    if len(shown) < len(queue):
        print(f"... {len(queue) - len(shown)} more (--limit 0 shows all)")
    print(status.message())


def _decide(args) -> None:
    layout = RunLayout.for_run(args.run)
    queue, info = read_review_queue(layout.review_queue)
    store = DecisionStore.open()
    ids = set(args.ids)
    if args.flagged:
        decided = set(lineage_decisions(store, args.run, info)["example_id"].tolist())
        ids |= {int(i) for i in queue["example_id"] if int(i) not in decided}
    if not ids:
        raise ReviewError("review decide: give example ids, or --flagged for every undecided flagged example")
    examples = pd.read_parquet(layout.examples)
    train_ids = examples.loc[examples["split"] == "train", "example_id"].to_numpy(np.int64)
    unknown = sorted(set(ids) - set(train_ids.tolist()))
    if unknown:
        raise ReviewError(f"review decide: id(s) {unknown[:10]} are not training examples of run {args.run}")
    num_classes = info.get("num_classes")
    if args.action == "relabel" and args.label is not None and num_classes and not 0 <= args.label < num_classes:
        raise ReviewError(f"review decide: label {args.label} is outside the run's classes [0, {num_classes})")
    count = store.record(args.run, ids, args.action, label=args.label, reviewer=args.reviewer, note=args.note)
    label = f" -> {args.label}" if args.action == "relabel" else ""
    print(f"recorded {args.action}{label} for {count} example(s) of run {args.run} in {store.location}")
    print(_gate(queue, info, lineage_decisions(store, args.run, info).set_index("example_id")).message())


def _summary(store: DecisionStore) -> None:
    runs_dir = data_dir() / "runs"
    rows = []
    for path in sorted(runs_dir.glob("*/review_queue.parquet")):
        queue, info = read_review_queue(path)
        current = lineage_decisions(store, path.parent.name, info).set_index("example_id")
        status = _gate(queue, info, current)
        rows.append(
            {
                "run": path.parent.name,
                "flagged": status.flagged,
                "decided": status.reviewed,
                "pending": status.unreviewed,
                "gate": "open" if status.passed else "BLOCKED",
            }
        )
    if not rows:
        print(f"no review queues under {runs_dir} yet (materialise a run's review_queue, e.g. `z0inf demo`)")
        return
    print(pd.DataFrame(rows).to_string(index=False))


def _gate(queue: pd.DataFrame, info: dict, current: pd.DataFrame):
    return evaluate_gate(
        queue["example_id"], current.index, info["training_examples"], info["policy"]["max_unreviewed_fraction"]
    )


def _describe(current: pd.DataFrame, example_id: int, run_id: str) -> str:
    """The decision in force; one inherited from an earlier round names the run it was made on."""
    if example_id not in current.index:
        return ""
    row = current.loc[example_id]
    action = f"relabel {row['label']}" if row["action"] == "relabel" else str(row["action"])
    decided_on = row.get("decided_on_run")
    return action if decided_on in (None, run_id) else f"{action} (decided on run {decided_on[:8]})"


def _sparkline(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    low, high = values.min(), values.max()
    scaled = (
        np.zeros(len(values), dtype=int) if high == low else ((values - low) / (high - low) * 7).round().astype(int)
    )
    return f"{values[0]:.3g} {''.join(_SPARKS[i] for i in scaled)} {values[-1]:.3g}"
