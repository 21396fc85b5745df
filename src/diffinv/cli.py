"""The ``diffinv`` command line: one subcommand per module in :mod:`diffinv.commands`.

Errors are one line on stderr: ``error: ...``, exit 2 for usage errors (bad options, files,
prompts), 1 for runtime failures; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["CommandError", "UsageError", "first_line", "main"]

COMMANDS = ("solvers", "demo", "edit", "bench", "score", "report", "weights", "app")

# The extra (pyproject's optional dependencies) that installs each optional top-level package.
EXTRAS = {
    "diffusers": "diffusers",
    "transformers": "diffusers",
    "accelerate": "diffusers",
    "safetensors": "diffusers",
    "torchmetrics": "bench",
    "skimage": "bench",
    "gradio": "app",
    "gradio_client": "app",
    "sklearn": "train",
}


class UsageError(ValueError):
    """Bad input from the user: exit status 2."""


class CommandError(RuntimeError):
    """A failure while running: exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def first_line(err: BaseException) -> str:
    """The one line an error is reported by: its message's first line, or its type's name if it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = _Parser(prog="diffinv", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"diffinv.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"diffinv.commands.{name}":
                continue  # subcommand not built yet
            raise
        module.add_parser(sub)
    for command in sub.choices.values():  # `diffinv edit ... --debug` as well as `diffinv --debug edit ...`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    """The subcommand names of ``parser``."""
    return [name for action in parser._subparsers._group_actions for name in action.choices]


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        print(f"error: give a command: {', '.join(sorted(_commands(parser)))} (see 'diffinv --help')", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        package = (getattr(err, "name", None) or "").split(".")[0] if isinstance(err, ModuleNotFoundError) else ""
        if package in EXTRAS:
            print(f"error: {args.command} needs {package}: pip install 'diffinv[{EXTRAS[package]}]'", file=sys.stderr)
            return 1
        usage = isinstance(err, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError))
        usage = usage and not isinstance(err, CommandError)
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2 if usage else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
