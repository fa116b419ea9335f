"""``z0inf train`` (a contract run in MLflow, its id on stdout) and ``z0inf runs`` (list contract runs)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

from ..training.datasets import NOISE_KINDS
from ..training.models import MODEL_KINDS
from ..training.trainer import OPTIMIZERS, SCHEDULES, TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    defaults = TrainConfig()
    train = sub.add_parser("train", help="train a model and log a contract run to MLflow; prints the run id")
    train.add_argument("--dataset", default=defaults.dataset,
                       help="digits, breast_cancer, or a .csv/.parquet file (default: %(default)s)")
    train.add_argument("--label-column", default=defaults.label_column, help="label column of a table dataset")
    train.add_argument("--model", choices=MODEL_KINDS, default=defaults.model)
    train.add_argument("--hidden", type=_widths, default=defaults.hidden, metavar="W[,W...]",
                       help="hidden widths, e.g. 128,64 (default: 64)")
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--checkpoints", type=int, default=defaults.checkpoints, metavar="T",
                       help="evenly spaced checkpoints, first and last included (default: %(default)s)")
    train.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                       help="instead: one checkpoint every N --checkpoint-unit (plus first and last)")
    train.add_argument("--checkpoint-unit", choices=["epoch", "step"], default=defaults.checkpoint_unit)
    train.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule)
    train.add_argument("--momentum", type=float, default=defaults.momentum)
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--test-fraction", type=float, default=defaults.test_fraction)
    train.add_argument("--label-noise", type=float, default=defaults.label_noise, metavar="FRACTION",
                       help="flip this fraction of training labels (default: 0)")
    train.add_argument("--noise-kind", choices=NOISE_KINDS, default=defaults.noise_kind)
    train.add_argument("--noise-seed", type=int, default=defaults.noise_seed)
    _add_store_args(train)
    train.add_argument("--experiment", default="z0inf", help="MLflow experiment (default: %(default)s)")
    train.set_defaults(handler=_train)

    runs = sub.add_parser("runs", help="list contract runs in MLflow, oldest first")
    _add_store_args(runs)
    runs.add_argument("--experiment", action="append", dest="experiments", metavar="NAME",
                      help="only this experiment (repeatable; default: all)")
    runs.add_argument("--all", action="store_true", help="include runs that are not FINISHED")
    runs.add_argument("--validate", action="store_true", help="download each run and check it against the contract")
    runs.set_defaults(handler=_runs)


def _add_store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the "
                        "mlflow_configs choice, else SQLite under the data directory)")


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of widths") from None
    return widths


def _train(args) -> None:
    from ..tracking import train_and_log

    config = TrainConfig(
        dataset=args.dataset, model=args.model, hidden=args.hidden, epochs=args.epochs, checkpoints=args.checkpoints,
        optimizer=args.optimizer, lr=args.lr, schedule=args.schedule, momentum=args.momentum,
        weight_decay=args.weight_decay, batch_size=args.batch_size, seed=args.seed, test_fraction=args.test_fraction,
        label_noise=args.label_noise, noise_kind=args.noise_kind, noise_seed=args.noise_seed,
        checkpoint_every=args.checkpoint_every, checkpoint_unit=args.checkpoint_unit, label_column=args.label_column,
    )
    run_id = train_and_log(config, tracking_uri=args.tracking_uri, experiment=args.experiment, progress=True)
    print(run_id)


def _runs(args) -> None:
    from ..tracking import ContractError, list_contract_runs, validate_run

    runs = list_contract_runs(tracking_uri=args.tracking_uri, status=None if args.all else "FINISHED",
                              experiment_names=args.experiments)
    if not runs:
        print("no contract runs", file=sys.stderr)
        return
    print(f"{'run_id':32}  {'started (UTC)':16}  {'status':8}  {'ckpts':>5}  {'test_acc':>8}  name")
    for run in runs:
        started = datetime.fromtimestamp(run.start_time / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
        accuracy = run.metrics.get("test_accuracy")
        line = (f"{run.run_id:32}  {started:16}  {run.status:8}  {run.tags.get('z0inf.num_checkpoints', '-'):>5}  "
                f"{'-' if accuracy is None else f'{accuracy:.4f}':>8}  {run.run_name}")
        if args.validate:
            try:
                validate_run(run.run_id, tracking_uri=args.tracking_uri)
                line += "  [valid]"
            except ContractError as exc:
                line += f"  [INVALID: {exc}]"
        print(line)
