"""The ``selfalign`` command line: a thin dispatcher over :mod:`selfalign.commands`.

Each command module exposes ``add_parser(subparsers)`` (which sets ``func``) and is imported only
when listed here, so ``selfalign models`` does not pay for importing the trainer. A user's mistake
(:class:`~selfalign.errors.SelfalignError`) ends with one line on stderr and exit code 2; any other
exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from .commands.argtypes import OneLineParser
from .errors import SelfalignError


# One line per command module; each registers one or more subcommands.
COMMAND_MODULES = [
    "selfalign.commands.models",
    "selfalign.commands.prepare",
    "selfalign.commands.convert",
    "selfalign.commands.train",
    "selfalign.commands.demo",
    "selfalign.commands.report",
    "selfalign.commands.sample",
    "selfalign.commands.evaluate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="selfalign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:     # --help (0) or a flag out of range (2, one line already printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        result = args.func(args)
    except SelfalignError as err:
        # A user's mistake (config, flag, data, checkpoint, path): the message already says what
        # is wrong and how to fix it.
        print(f"selfalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"selfalign {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        # Anything else is a bug in selfalign: keep the traceback, and ask for it.
        traceback.print_exc()
        print(f"selfalign {args.command}: internal error (a bug in selfalign, not in your input); "
              f"please report it with the traceback above", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
