"""``diffinv demo``: every solver inverts, reconstructs and edits exact toy scenes; table, CSV and figures."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..demo import DIGITS_REFERENCE_STEPS, GRIDS, MODELS, PATHS, DemoConfig, format_table, run_demo, write_outputs


class _Renamed(argparse.Action):
    """A renamed option that still works and says its new name."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        print(f"note: {option_string} is now --spacing", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="offline demo on the exact toy-scene model: invert, reconstruct and edit with every solver",
        description=__doc__,
    )
    defaults = DemoConfig()
    p.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    p.add_argument(
        "--model",
        choices=MODELS,
        default=defaults.model,
        help="toy = exact toy scenes; digits = the shipped trained digits network, every solver on both grids "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--path",
        choices=PATHS,
        default=defaults.path,
        help="vp = the toy scenes on SD's VP schedule; flow = on the rectified-flow path (SD3/FLUX), exact velocity,"
        " every solver on the sigma-uniform grid (default: %(default)s)",
    )
    p.add_argument("--steps", type=int, default=defaults.steps, help="solver steps (default: %(default)s)")
    p.add_argument(
        "--guidance",
        type=float,
        default=defaults.guidance,
        help="classifier-free guidance scale (default: %(default)s)",
    )
    p.add_argument("--images", type=int, default=defaults.images, help="source images (default: %(default)s)")
    p.add_argument("--solvers", default=None, help="comma-separated solver names (default: all registered)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the source images (default: %(default)s)")
    p.add_argument(
        "--spacing",
        dest="grid",
        choices=GRIDS,
        default=defaults.grid,
        help="time grid: auto = time-uniform for exact solvers, ddim and dpmpp_2m, lambda-uniform for RK "
        "(default: %(default)s)",
    )
    # The old name, hidden: `diffinv edit --grid` is a picture, so the demo's grid spacing is --spacing now.
    p.add_argument("--grid", dest="grid", choices=GRIDS, action=_Renamed, help=argparse.SUPPRESS)
    p.add_argument(
        "--npi", action="store_true", help="negative-prompt inversion: the source prompt as unconditional branch"
    )
    p.add_argument(
        "--reference-steps",
        type=int,
        default=None,
        help=f"steps of the RK4 reference edit (default: {defaults.reference_steps}, "
        f"{DIGITS_REFERENCE_STEPS} for --model digits)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _solvers(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--solvers got no solver names: {text!r}")
    return names


def _reference_steps(args: argparse.Namespace) -> int:
    if args.reference_steps is not None:
        return args.reference_steps
    return DIGITS_REFERENCE_STEPS if args.model == "digits" else DemoConfig().reference_steps


def run(args: argparse.Namespace) -> int:
    config = DemoConfig(
        steps=args.steps,
        guidance=args.guidance,
        images=args.images,
        solvers=_solvers(args.solvers),
        seed=args.seed,
        grid=args.grid,
        npi=args.npi,
        reference_steps=_reference_steps(args),
        model=args.model,
        path=args.path,
    )
    config.check()
    try:  # before the run, not after it
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create output folder {args.out}: {err.strerror or err}") from None
    start = time.perf_counter()
    with torch.inference_mode():
        result = run_demo(config, progress=not args.no_progress)
    wall = time.perf_counter() - start
    print(format_table(result.rows))
    paths = write_outputs(result, args.out)
    diverged = [r["solver"] for r in result.rows if r["diverged"]]
    mode = "negative-prompt inversion" if config.npi else "full-guidance inversion"
    print(
        f"\n{len(result.runs)} solvers, {config.images} images x {len(result.targets) - 1} edits, "
        f"w = {config.guidance:g}, {config.steps} steps, {mode}, {config.path} path; reference = rk4 with "
        f"{config.reference_steps} {'sigma' if config.path == 'flow' else 'lambda'}-uniform steps; {wall:.1f} s"
        + (f"; diverged: {', '.join(diverged)}" if diverged else "")
    )
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0
