"""The ``z0inf`` command: one sub-command module per stage of the flow, registered in order.

``main`` is the one error boundary: every expected failure is a ``Z0infError`` and ends as one line,
``z0inf: error: ...``, with exit status 2; ``--debug`` shows the traceback instead. Anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import Z0infError
from . import influence as influence_commands
from . import training as training_commands
from . import review as review_commands
from . import pipeline as pipeline_commands

_COMMAND_MODULES = [influence_commands, training_commands, review_commands, pipeline_commands]
EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="z0inf", description="Zeroth-order data influence (Z0-Inf) pipeline.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except Z0infError as exc:
        if args.debug:
            raise
        print(f"z0inf: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
