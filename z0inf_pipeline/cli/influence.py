"""``z0inf gram | self-influence | train-test``: the core on files, writing parquet."""

from __future__ import annotations

import argparse

from ..influence.analysis import (
    GRAM_SETTINGS,
    GramProvenance,
    InfluenceAnalysis,
    InfluenceArguments,
    gram_to_frame,
    write_frame,
)
from ..influence.atomic import check_output
from ..influence.checkpoints import open_checkpoints, select_parameters
from ..influence.devices import resolve_device
from ..influence.gram import gram_matrix
from ..settings_schema import add_arguments, from_namespace


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
    _add_estimator_args(si)
    si.set_defaults(handler=_self_influence)

    tt = sub.add_parser("train-test", help="top-k proponents and opponents of every test example")
    _add_checkpoint_args(tt)
    tt.add_argument("train_losses", help="training loss table (parquet)")
    tt.add_argument("test_losses", help="test loss table (parquet)")
    _add_estimator_args(tt, exclude=())
    tt.set_defaults(handler=_train_test)


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", help="folder of *.safetensors checkpoints (with 'step' in their metadata)")
    parser.add_argument("-o", "--output", required=True, help="parquet file to write (atomically)")
    add_arguments(parser, InfluenceArguments, include=GRAM_SETTINGS)
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")


def _add_estimator_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ("topk",)) -> None:
    add_arguments(parser, InfluenceArguments, exclude=(*GRAM_SETTINGS, *exclude))
    parser.add_argument("--gram", help="reuse a Gram parquet written by 'z0inf gram' instead of reading checkpoints")


def _gram(args) -> None:
    check_output(args.output, [args.checkpoints])
    checkpoints = open_checkpoints(args.checkpoints)
    names = select_parameters(checkpoints, args.parameters)
    gram = gram_matrix(
        checkpoints, parameters=names, center=args.center, device=resolve_device(args.device), progress=True
    )
    frame = gram_to_frame([c.step for c in checkpoints], gram, GramProvenance.of(checkpoints, names, args.center))
    print(f"wrote {write_frame(frame, args.output)} ({len(checkpoints)} checkpoints)")


def _analysis(args, test_losses=None) -> InfluenceAnalysis:
    """The analysis of the command's inputs, once its output path is known not to replace any of them."""
    check_output(args.output, [args.checkpoints, args.train_losses, test_losses, args.gram])
    return InfluenceAnalysis(
        args.checkpoints,
        args.train_losses,
        test_losses,
        from_namespace(InfluenceArguments, args),
        device=resolve_device(args.device),
        gram=args.gram,
    )


def _self_influence(args) -> None:
    frame = _analysis(args).self_influence_frame()
    print(f"wrote {write_frame(frame, args.output)} ({len(frame)} training examples)")


def _train_test(args) -> None:
    frame = _analysis(args, args.test_losses).topk_frame()
    print(f"wrote {write_frame(frame, args.output)} ({frame['test_example_id'].nunique()} test examples)")
