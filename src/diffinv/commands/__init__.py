"""Subcommands of the ``diffinv`` command line, one module each (``add_parser(subparsers)``), and the
option parsing they share."""

from __future__ import annotations

import ast
import json
from typing import Any


def parse_key_values(items: list[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings (repeated ``flag`` options) as a dict.

    Values are read as JSON (``0.96``, ``true``), else as a Python literal (``True``, ``(1, 2)``), else kept as text.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} must be KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        out[key.strip()] = value
    return out


def add_weights_argument(parser: Any) -> None:
    """The ``--weights DIR`` option of every command that loads metric networks (see :mod:`diffinv.weights`)."""
    from pathlib import Path

    parser.add_argument(
        "--weights",
        type=Path,
        metavar="DIR",
        help="folder of metric weights (diffinv weights download --dir DIR), looked up before the hub "
        "(default: $DIFFINV_WEIGHTS)",
    )
