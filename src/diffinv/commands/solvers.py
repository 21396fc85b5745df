"""``diffinv list-solvers``: every registered solver with its cost and guarantees."""

from __future__ import annotations

import argparse
from typing import Any

from ..solvers import get_solver, list_solvers, solver_options


def add_parser(sub: Any) -> None:
    p = sub.add_parser("list-solvers", help="list solvers: NFE per step, exact?, order, options")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=run)


def solver_table() -> list[dict[str, Any]]:
    """One row per registered solver, built with its default options."""
    rows = []
    for name in list_solvers():
        s = get_solver(name)
        rows.append(
            {
                "name": name,
                "nfe_per_step": s.nfe_per_step,
                "exact": "yes" if s.exact else "no",
                "order": s.order,
                "reversal": "exact" if s.exact else f"h^{s.reversal_order}" if s.reversal_order else "-",
                "options": ", ".join(f"{k}={v!r}" for k, v in solver_options(name).items()) or "-",
            }
        )
    return rows


def run(args: argparse.Namespace) -> int:
    rows = solver_table()
    cols = ["name", "nfe_per_step", "exact", "order", "reversal", "options"]
    if args.markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(str(r[c]) for c in cols) + " |")
        return 0
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))
    return 0
