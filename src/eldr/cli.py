"""The `eldr` console script: one subcommand per module in `eldr.commands`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from eldr import __version__
from eldr.commands import capture, demo, fit, route, serve, simulate, trace
from eldr.errors import EldrError

EXIT_BAD_INPUT = 2

COMMANDS = (fit, route, serve, trace, simulate, demo, capture)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {one_line(message)}\n")


def one_line(message: str) -> str:
    """A message on one line: newlines inside it (a path, an exception's text) become spaces."""
    return " ".join(message.splitlines()) if message else message


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _exit_cleanly_on_sigterm() -> Any:
    """SIGTERM (a scheduler, `timeout`, `kill`) unwinds like Ctrl-C, so that half-written outputs' temporary
    files are removed (eldr.atomicfile); servers (`eldr serve`) install their own handler later.
    Returns the previous handler (None off the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _terminated)


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer killed by a closed pipe


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous_sigterm = _exit_cleanly_on_sigterm()
    try:
        return _run(args)
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _run(args: argparse.Namespace) -> int:
    try:
        with warnings.catch_warnings():
            # numpy's floating-point warnings (NaN metrics of empty groups, casts of refused values) are
            # not errors: the command's answer, or its one error line, says what matters
            warnings.simplefilter("ignore", RuntimeWarning)
            code: int = args.func(args)
    except EldrError as exc:
        print(f"eldr {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError:  # only within a raised ELDR_MAX_BYTES, or under a tight ulimit: still one line
        print(
            f"eldr {args.command}: error: out of memory; the inputs are within ELDR_MAX_BYTES but this "
            "machine (or ulimit) cannot hold them: use smaller inputs or a lower ELDR_MAX_BYTES "
            "(docs/limits.md)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`eldr trace info x.npz | head -1`): stop quietly, as Unix tools do; point
        # stdout at /dev/null so that the interpreter's final flush does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return code


if __name__ == "__main__":
    sys.exit(main())
