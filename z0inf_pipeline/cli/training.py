"""``z0inf train`` (a contract run in MLflow, its id on stdout) and ``z0inf runs`` (list contract runs)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

from ..training.trainer import TrainConfig, TrainRecipe
from .arguments import add_settings, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a model and log a contract run to MLflow; prints the run id")
    add_settings(train.add_argument_group("training recipe"), TrainRecipe)
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


def _train(args) -> None:
    from ..tracking import train_and_log

    config = settings_from(args, TrainRecipe, base=TrainConfig())
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
