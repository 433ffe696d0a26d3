"""The `eldr` console script: one subcommand per module in `eldr.commands`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from eldr import __version__
from eldr.commands import capture, demo, fit, route, serve, simulate, trace
from eldr.errors import EldrError

EXIT_BAD_INPUT = 2

COMMANDS = (fit, route, serve, trace, simulate, demo, capture)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eldr",
        description=(
            "Expert-locality-aware decode routing for prefill/decode-disaggregated MoE serving "
            "(arXiv 2607.00466)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"eldr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except EldrError as exc:
        print(f"eldr {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
