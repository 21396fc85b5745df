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


def add_runtime_arguments(p: Any) -> None:
    """The memory and speed options (:mod:`diffinv.runtime`), shared by ``edit`` and ``bench``."""
    from ..runtime import COMPILE_MODE, COMPILE_MODES, OFFLOAD_CHOICES

    p.add_argument(
        "--offload",
        choices=OFFLOAD_CHOICES,
        default=None,
        help="CPU offload through diffusers: 'model' (whole models move to the GPU in turn: SDXL fits 12-16 GB) "
        "or 'sequential' (layer by layer: least memory, slowest); needs a GPU (default: none)",
    )
    p.add_argument("--vae-tiling", action="store_true", help="encode/decode in VAE tiles (large images)")
    p.add_argument("--vae-slicing", action="store_true", help="encode/decode one image at a time (large batches)")
    p.add_argument(
        "--compile",
        nargs="?",
        const=COMPILE_MODE,
        default=None,
        choices=COMPILE_MODES,
        metavar="MODE",
        help=f"torch.compile the denoiser (mode default {COMPILE_MODE}; the first call of each shape compiles)",
    )


def runtime_options(args: Any) -> dict[str, Any]:
    """The Editor keywords of :func:`add_runtime_arguments`' options."""
    return {
        "offload": args.offload,
        "vae_tiling": args.vae_tiling,
        "vae_slicing": args.vae_slicing,
        "compile": args.compile or False,
    }
