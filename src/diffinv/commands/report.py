"""``diffinv report``: the PIE-Bench tables (Markdown, CSV) and figures from one or more runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="aggregate PIE-Bench runs: tables per run and per edit type, Fig. 4/7-style plots, a qualitative grid",
    )
    p.add_argument("runs", nargs="+", type=Path, help="run folders (a folder of run folders, e.g. a preset, counts)")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md, summary CSVs and PNG figures")
    p.add_argument("--ids", help="image ids for the qualitative grid, comma-separated (default: the first four)")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.report import find_runs, write_report

    ids = None if args.ids is None else [i.strip() for i in args.ids.split(",") if i.strip()]
    for path in write_report(find_runs(args.runs), args.out, ids=ids, plots=not args.no_plots):
        print(path)
    return 0
