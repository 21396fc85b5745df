"""``diffinv bench``: run a solver (or a preset's runs) over PIE-Bench and write the metrics tables."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..cli import CommandError, UsageError, first_line
from ..solvers import SPACING_CHOICES
from . import add_runtime_arguments, add_weights_argument, parse_key_values, runtime_options
from .control import add_control_arguments, control_options


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="run a solver over PIE-Bench: edits, reconstructions, per-image metrics (resumable, multi-GPU)",
        description="Edit every PIE-Bench image and score it with the official metrics. Resumable: rerun the "
        "same command to finish an interrupted run. Multi-GPU: accelerate launch -m diffinv bench ...",
    )
    p.add_argument("--data", type=Path, help="PIE-Bench folder (mapping_file.json + annotation_images/)")
    p.add_argument("--model", help="diffusers model: hub id or local folder")
    p.add_argument("--solver", help="solver name (diffinv list-solvers; default ees27)")
    p.add_argument(
        "--solver-option",
        action="append",
        metavar="K=V",
        help="solver option, repeatable, e.g. gamma=0.96 (default: the solver's own)",
    )
    p.add_argument("--steps", type=int, default=50, help="solver steps (default: %(default)s)")
    p.add_argument(
        "--spacing",
        help=f"grid spacing: {', '.join(SPACING_CHOICES)} (default auto: each solver on its reference grid, time for "
        "DDIM and the exactly reversible solvers, lambda for Runge-Kutta/EES; config.json records the one used)",
    )
    p.add_argument("--guidance", type=float, help="editing CFG scale (default 3; 7.5 with npi)")
    p.add_argument("--inversion-guidance", type=float, help="CFG scale while inverting (default: --guidance)")
    p.add_argument(
        "--inversion",
        help="plain (default), null-text (needs a one-step solver: ddim, euler, heun, rk4, ees..) or direct (with P2P)",
    )
    p.add_argument("--smoothing", nargs="*", help="smoothing strategies: npi, proximal, smooth-lora (default: none)")
    p.add_argument(
        "--editor-option",
        action="append",
        default=[],
        metavar="K=V",
        help="other Editor option, e.g. size=[512,512] (default: none)",
    )
    p.add_argument("--prompts", help="prompt rule: standard (default), large-deviation, greyscale")
    p.add_argument(
        "--dtype",
        default="auto",
        help="model dtype: auto (default: fp16 on CUDA, bf16 for FLUX, else fp32), fp16, bf16, fp32, fp64",
    )
    p.add_argument(
        "--seed", type=int, default=1234, help="per-image seed, as the official scripts (default: %(default)s)"
    )
    p.add_argument("--device", help="device (default: Accelerate's, i.e. this process's GPU, else CPU)")
    p.add_argument("--types", help="edit types to run, e.g. 0,1,2 (default: all)")
    p.add_argument("--ids", help="image ids to run, comma-separated (default: all)")
    p.add_argument("--limit", type=int, help="only the first N selected images (id order; default: all)")
    p.add_argument(
        "--metrics",
        default="all",
        help="comma-separated subset of structure_distance,psnr,lpips,mse,ssim,clip_whole,clip_edited (default "
        "all); not part of a run's identity: rerun with more to score the done images without editing them again",
    )
    p.add_argument(
        "--no-reconstruct",
        action="store_true",
        help="skip the reconstruction (a third of the solver cost) and its recon_* columns",
    )
    add_control_arguments(p, bench=True)
    add_weights_argument(p)
    add_runtime_arguments(p)
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        metavar="B",
        help="images per model call (invert, edit, reconstruct B images at once; a batch of 2B under guidance); "
        "not part of a run's identity, results equal batch size 1 to float round-off (default: %(default)s)",
    )
    p.add_argument("--preset", help="run a paper experiment (several runs, one folder each under --out)")
    p.add_argument("--only", help="with --preset: only these runs (comma-separated names)")
    p.add_argument("--list-presets", action="store_true", help="print the presets and their runs, then exit")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print each run, its images and its model calls, then exit without loading anything",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="with --preset: run every selected run even if one fails; exit 1 at the end listing the failures",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: one bar per run)")
    p.add_argument("--out", type=Path, help="run folder (with --preset: the folder holding one folder per run)")
    p.set_defaults(func=run)


def _csv_list(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def run(args: argparse.Namespace) -> int:
    from ..bench import PRESETS, RunConfig, get_preset, run_bench
    from ..bench.runner import check_batch_size

    if args.list_presets:
        for preset in PRESETS.values():
            print(f"{preset.name}: {preset.description}")
            for name, overrides in preset.runs.items():
                print(f"  {name}: {json.dumps(overrides, sort_keys=True)}")
        return 0
    for need in ("data", "model", "out"):
        if getattr(args, need) is None:
            raise UsageError(f"--{need} is required")
    try:
        check_batch_size(args.batch_size)
    except ValueError:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}") from None
    types = _csv_list(args.types)
    try:
        types_int = None if types is None else [int(t) for t in types]
    except ValueError:
        raise UsageError(f"--types must be integers 0-9, got {args.types!r}") from None
    given = {key: getattr(args, flag) for key, flag in PRESET_KEYS.items()}
    base = {
        "model": args.model,
        **{key: RUN_DEFAULTS[key] if value is None else value for key, value in given.items()},
        "steps": args.steps,
        "editor_options": parse_key_values(args.editor_option, "--editor-option"),
        "dtype": args.dtype,
        "seed": args.seed,
        "metrics": args.metrics,
        "reconstruct": not args.no_reconstruct,
    }
    base["solver_options"] = parse_key_values(base["solver_options"], "--solver-option")
    base["control"] = None if base["control"] == "none" else base["control"]
    base["p2p_options"] = control_options(args, bench=True)[1]
    if args.preset is None:
        if args.keep_going:
            raise UsageError("--keep-going needs --preset (it keeps going past a failed run)")
        runs = [(args.out, base)]
    else:
        preset = get_preset(args.preset)
        only = _csv_list(args.only)
        unknown = sorted(set(only or []) - set(preset.runs))
        if unknown:
            raise UsageError(f"preset {preset.name} has no run {', '.join(unknown)}; see --list-presets")
        _check_conflicts(preset, given)
        runs = [(args.out / name, {**base, **o}) for name, o in preset.runs.items() if only is None or name in only]
    if args.dry_run:
        return _dry_run(runs, args, types_int)
    runtime = runtime_options(args)
    failures = []
    for out, settings in runs:
        try:
            table = run_bench(
                RunConfig(**settings),
                args.data,
                out,
                types=types_int,
                ids=_csv_list(args.ids),
                limit=args.limit,
                device=args.device,
                progress=not args.no_progress,
                weights=args.weights,
                runtime=runtime,
                batch_size=args.batch_size,
            )
        except Exception as err:
            if not args.keep_going:
                raise
            print(f"error: run {out.name} failed: {first_line(err)}", file=sys.stderr)
            failures.append(out.name)
            continue
        print(table)
    if failures:
        raise CommandError(f"{len(failures)} of {len(runs)} runs failed: {', '.join(failures)}")
    return 0


def _dry_run(runs: list[tuple[Path, dict[str, Any]]], args: argparse.Namespace, types: list[int] | None) -> int:
    """Each run's images still to do and its denoiser calls (invert + edit + reconstruct), before any loading:
    one call per solver stage and batch of up to ``--batch-size`` images."""
    from ..bench import RunConfig
    from ..bench.runner import image_batches, select_records
    from ..solvers import get_solver

    _, records = select_records(args.data, types=types, ids=_csv_list(args.ids), limit=args.limit)
    total = 0
    for out, settings in runs:
        config = RunConfig(**settings)
        nfe = get_solver(config.solver, **config.solver_options).nfe_per_step
        todo = [r for r in records if not (out / "records" / f"{r.id}.json").is_file()]
        passes = 3 if config.reconstruct else 2  # invert, edit (and reconstruct)
        calls = len(image_batches(todo, args.batch_size)) * passes * nfe * config.steps
        total += calls
        print(
            f"{out}: {config.solver} {json.dumps(config.solver_options, sort_keys=True)}, {config.steps} steps on "
            f"the {config.spacing} grid, {len(todo)} of {len(records)} images to do, {calls} model calls"
        )
    batch = "2" if args.batch_size == 1 else f"up to {2 * args.batch_size} ({args.batch_size} images)"
    print(f"total: {len(runs)} runs, {total} model calls (each a batch of {batch} under guidance)")
    return 0


# The flags a preset's runs may also set (RunConfig key -> argparse dest), and their defaults without a preset.
PRESET_KEYS = {
    "solver": "solver",
    "solver_options": "solver_option",
    "spacing": "spacing",
    "guidance": "guidance",
    "inversion_guidance": "inversion_guidance",
    "inversion": "inversion",
    "smoothing": "smoothing",
    "prompts": "prompts",
    "control": "control",
}
RUN_DEFAULTS = {
    "solver": "ees27",
    "solver_options": [],
    "spacing": "auto",
    "guidance": None,
    "inversion_guidance": None,
    "inversion": "plain",
    "smoothing": [],
    "prompts": "standard",
    "control": None,
}


def _check_conflicts(preset: Any, given: dict[str, Any]) -> None:
    """A flag given on the command line that the preset also sets for some run is an error naming both."""
    for key, value in given.items():
        if value is not None and any(key in overrides for overrides in preset.runs.values()):
            flag = "--" + PRESET_KEYS[key].replace("_", "-")
            raise UsageError(f"{flag} conflicts with --preset {preset.name}, which sets {key} per run; drop one")
