"""``diffinv app``: a local web page that compares inversion solvers on one image, side by side."""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "app",
        help="web app: compare several solvers on your image in the browser (needs diffinv[app])",
        description=__doc__,
    )
    p.add_argument(
        "--model",
        default=None,
        help="a built-in model (digits: the shipped trained digits network; toy: the exact toy scenes) or a diffusers "
        "hub id / folder (default: digits, offline)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        raise ValueError("the app needs Gradio: pip install 'diffinv[app]'") from None
    from ..app import build_app, load_backend

    build_app(load_backend(args.model)).queue().launch(server_name=args.host, server_port=args.port)
    return 0
