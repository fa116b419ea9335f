"""The ``z0inf`` command: one sub-command module per stage of the flow, registered in order."""

from __future__ import annotations

import argparse
import sys

from ..influence.errors import InfluenceInputError
from . import influence as influence_commands
from . import training as training_commands
from . import review as review_commands
from . import pipeline as pipeline_commands

_COMMAND_MODULES = [influence_commands, training_commands, review_commands, pipeline_commands]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="z0inf", description="Zeroth-order data influence (Z0-Inf) pipeline.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except InfluenceInputError as exc:
        print(f"z0inf: error: {exc}", file=sys.stderr)
        return 2
