"""The ``aimcpipe`` command line.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together and turns errors into one line and
exit status 2, as docs/design.md §6 requires.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

# torch's OpenMP worker threads spin while they wait for work. On a machine that is busy with
# anything else, that makes a pipeline's many small operations several times slower (measured
# on 2 cores beside one busy process: a digits epoch took 3-8 s instead of 0.7 s with sleeping
# waits). Set before torch is first imported; a user's own OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from aimcpipe import __version__
from aimcpipe.errors import AimcpipeError

__all__ = ["main"]

DEBUG_ENV = "AIMCPIPE_DEBUG"
DEBUG_OFF = ("", "0", "false", "no", "off")
DEBUG_HELP = (
    f"on an error, print the full Python traceback (also: {DEBUG_ENV}=1); without it, an "
    "error is one line"
)

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "lsq": (
        "aimcpipe.launch.lsq_cmd",
        "least-squares reproduction of arXiv 2406.12774 (asymptotic error of Analog SGD)",
    ),
    "train": (
        "aimcpipe.launch.train_cmd",
        "train a model on simulated analog tiles with a pipeline policy",
    ),
    "simulate": (
        "aimcpipe.launch.simulate_cmd",
        "simulate pipeline schedules with the cycle cost model (speedup, utilization)",
    ),
    "speedup": (
        "aimcpipe.launch.speedup_cmd",
        "train at several stage counts and policies: measured vs predicted speedup",
    ),
}


class _Formatter(logging.Formatter):
    """Progress lines (INFO) as plain text; warnings and errors say what they are and where
    they come from; debug lines (``-v``) name their logger."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno == logging.INFO:
            return message
        return f"{record.levelname.lower()} ({record.name}): {message}"


class _Parser(argparse.ArgumentParser):
    """argparse parser whose errors are one line plus a hint, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="aimcpipe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"aimcpipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # command not built yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        # after the command too; SUPPRESS keeps `aimcpipe --debug CMD` working
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter())
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        from aimcpipe.analog.counting import forced

        forced()  # a bad AIMCPIPE_COUNT_KERNEL fails here, not at the first pulsed update
        return int(args._run(args) or 0)
    except AimcpipeError as exc:
        if args.debug or os.environ.get(DEBUG_ENV, "").strip().lower() not in DEBUG_OFF:
            _print_debug(exc)
        print(f"aimcpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aimcpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and friends: stop quietly, as Unix tools do.
        sys.stderr.close()
        return 0
    except OSError as exc:  # e.g. a disk that filled up while the results were written
        where = f" {exc.filename}" if exc.filename else ""
        reason = exc.strerror or str(exc)
        print(f"aimcpipe {args.command}: error: cannot write or read{where}: {reason}",
              file=sys.stderr)  # fmt: skip
        return 2


def _print_debug(exc: AimcpipeError) -> None:
    """The traceback behind a one-line error: the exception chain (user code's exception
    first) and a traceback sent back by a stage process or actor."""
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        traceback.print_exception(cause, file=sys.stderr)
    else:
        traceback.print_exception(exc, file=sys.stderr)
    if exc.details:
        print(exc.details.rstrip(), file=sys.stderr)
