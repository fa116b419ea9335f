"""``z0inf gram | self-influence | train-test``: the core on files, writing parquet."""

from __future__ import annotations

import argparse
from ..influence.analysis import (
    GramArguments,
    GramProvenance,
    InfluenceAnalysis,
    InfluenceArguments,
    LossArguments,
    TopKArguments,
    TrainTestArguments,
    WindowArguments,
    gram_to_frame,
    write_frame,
)
from ..errors import InputError
from ..influence.atomic import check_output
from ..influence.checkpoints import open_checkpoints, select_parameters
from ..influence.devices import resolve_device
from ..influence.gram import gram_matrix
from .arguments import add_settings, settings_from

# `train-test --full` writes N x M float64 values: 2.5 * 10^7 entries is 200 MB in memory, a parquet
# file of about as much; past that, the top-k is what to ask for.
FULL_MATRIX_LIMIT = 25_000_000
# The estimator settings each command shows besides the Gram's (``GramArguments``): train-test takes its
# window from ``TrainTestArguments``; self-influence keeps no top-k.
ESTIMATOR_SETTINGS = {
    "self-influence": (WindowArguments, LossArguments),
    "train-test": (LossArguments, TopKArguments),
}


def register(sub: argparse._SubParsersAction) -> None:
    gram = sub.add_parser("gram", help="weight Gram matrix of a folder of safetensors checkpoints")
    _add_checkpoint_args(gram)
    gram.set_defaults(handler=_gram)

    si = sub.add_parser(
        "self-influence",
        help="every signal of every training example: Z0 self-influence and the loss-table ones "
        "(variance, mean and final loss, confidence, variability)",
    )
    _add_checkpoint_args(si)
    si.add_argument("train_losses", help="training loss table (parquet)")
    _add_estimator_args(si, ESTIMATOR_SETTINGS["self-influence"])
    si.set_defaults(handler=_self_influence)

    tt = sub.add_parser(
        "train-test",
        help="top-k proponents and opponents of every test example (or, with --full, the whole N x M matrix)",
        description="Train-test influence. From files (checkpoints and loss tables) only the trajectory method "
        "can run: random directions (the default) and the opt-in tracincp and trak (classification runs) need the "
        "run's model and data, which --run RUN_ID takes from a contract run (its checkpoints, loss tables and "
        "model). Most accurate on the suite: directions and tracincp (LDS 0.46), trak 0.34 (benchmarks/README.md).",
    )
    _add_checkpoint_args(tt, optional=True)
    tt.add_argument("train_losses", nargs="?", help="training loss table (parquet); not with --run")
    tt.add_argument("test_losses", nargs="?", help="test loss table (parquet); not with --run")
    _add_estimator_args(tt, ESTIMATOR_SETTINGS["train-test"])
    add_settings(tt.add_argument_group("train-test method (defaults chosen on the suite's LDS)"), TrainTestArguments,
                 shortcuts=["warmup_fraction"])
    tt.add_argument("--run", metavar="RUN_ID", help="a contract run's checkpoints, loss tables, model and data "
                    "(MLflow at $MLFLOW_TRACKING_URI)")
    tt.add_argument("--full", action="store_true",
                    help=f"write the whole N x M matrix (rows example_id, one column per test example; at most "
                    f"{FULL_MATRIX_LIMIT:,} entries) instead of the top-k")
    tt.set_defaults(handler=_train_test)


def _add_checkpoint_args(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    parser.add_argument("checkpoints", nargs="?" if optional else None,
                        help="folder of *.safetensors checkpoints (with 'step' in their metadata)")
    parser.add_argument("-o", "--output", required=True, help="parquet file to write (atomically)")
    add_settings(parser, GramArguments)
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")


def _add_estimator_args(parser: argparse.ArgumentParser, concepts: tuple[type, ...]) -> None:
    for concept in concepts:
        add_settings(parser, concept, shortcuts=["topk"] if concept is TopKArguments else ())
    parser.add_argument("--gram", help="reuse a Gram parquet written by 'z0inf gram' instead of reading checkpoints")


def _gram(args) -> None:
    check_output(args.output, [args.checkpoints])
    checkpoints = open_checkpoints(args.checkpoints)
    settings = settings_from(args, GramArguments)
    names = select_parameters(checkpoints, settings.parameters)
    gram = gram_matrix(
        checkpoints, parameters=names, center=settings.center, device=resolve_device(args.device), progress=True
    )
    frame = gram_to_frame([c.step for c in checkpoints], gram, GramProvenance.of(checkpoints, names, settings.center))
    print(f"wrote {write_frame(frame, args.output)} ({len(checkpoints)} checkpoints)")


def _analysis(args, test_losses=None, **train_test) -> InfluenceAnalysis:
    """The analysis of the command's inputs, once its output path is known not to replace any of them."""
    check_output(args.output, [args.checkpoints, args.train_losses, test_losses, args.gram])
    return InfluenceAnalysis(
        args.checkpoints,
        args.train_losses,
        test_losses,
        influence_arguments_of(args),
        device=resolve_device(args.device),
        gram=args.gram,
        **train_test,
    )


def influence_arguments_of(args) -> InfluenceArguments:
    """The command's ``InfluenceArguments``, from the concepts its flags show (on ``train-test`` the window
    flags are ``TrainTestArguments``', so ``WindowArguments`` keeps its defaults here)."""
    command = "train-test" if args.handler is _train_test else "self-influence"
    values = {}
    for concept in (GramArguments, *ESTIMATOR_SETTINGS[command]):
        values.update(settings_from(args, concept, shortcuts=["topk"] if concept is TopKArguments else ()))
    return InfluenceArguments(**values)


def _self_influence(args) -> None:
    frame = _analysis(args).self_influence_frame()
    print(f"wrote {write_frame(frame, args.output)} ({len(frame)} training examples)")


def _train_test(args) -> None:
    train_test = settings_from(args, TrainTestArguments, shortcuts=["warmup_fraction"])
    if args.run:
        given = [name for name in ("checkpoints", "train_losses", "test_losses") if getattr(args, name)]
        if given:
            raise InputError(f"train-test --run takes the run's own files; drop {given}")
        analysis = _run_analysis(args, train_test)
    else:
        missing = [name for name in ("checkpoints", "train_losses", "test_losses") if not getattr(args, name)]
        if missing:
            raise InputError(f"train-test: give checkpoints, train_losses and test_losses, or --run RUN_ID "
                                      f"(missing {missing})")
        analysis = _analysis(args, args.test_losses, train_test=train_test)
    if args.full:
        size = len(analysis.train.example_ids) * len(analysis.test.example_ids)
        if size > FULL_MATRIX_LIMIT:
            raise InputError(
                f"train-test --full: {len(analysis.train.example_ids):,} x {len(analysis.test.example_ids):,} = "
                f"{size:,} entries is above the limit of {FULL_MATRIX_LIMIT:,} (the full matrix is for measurement "
                "on small runs); drop --full for the top-k"
            )
        frame = analysis.full_frame()
        shown = f"{len(frame)} x {frame.shape[1] - 1} matrix"
    else:
        frame = analysis.topk_frame()
        shown = f"{frame['test_example_id'].nunique()} test examples"
    method, fallback = analysis.train_test_method
    if fallback:
        print(f"note: {fallback}")
    print(f"wrote {write_frame(frame, args.output)} ({shown}; method {method})")


def _run_analysis(args, train_test: TrainTestArguments) -> InfluenceAnalysis:
    """A contract run's analysis: its checkpoints and loss tables, and its model and rebuilt data for
    random directions (without rebuildable data the trajectory answers, and the output says so)."""
    import pandas as pd

    from ..training.reevaluate import forward_access, rebuild_data, refuse_unfit_method
    from ..tracking import fetch_run

    run = fetch_run(args.run)
    refuse_unfit_method(run.run_id, run.train_config, train_test.method)
    check_output(args.output, [run.cache_dir])
    device = resolve_device(args.device)
    analysis = InfluenceAnalysis(run.checkpoints, run.train_losses, run.test_losses,
                                 influence_arguments_of(args), device=device, gram=args.gram,
                                 train_test=train_test)
    data = rebuild_data(run.run_id, run.train_config, run.model_spec, pd.read_parquet(run.examples))
    analysis.forward = forward_access(run.build_model, data, analysis.train.example_ids, analysis.test.example_ids)
    return analysis
