"""``diffinv bench``: run a solver (or a preset's runs) over PIE-Bench and write the metrics tables."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..cli import UsageError
from ..solvers import SPACING_CHOICES
from . import add_weights_argument, parse_key_values


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="run a solver over PIE-Bench: edits, reconstructions, per-image metrics (resumable, multi-GPU)",
        description="Edit every PIE-Bench image and score it with the official metrics. Resumable: rerun the "
        "same command to finish an interrupted run. Multi-GPU: accelerate launch -m diffinv bench ...",
    )
    p.add_argument("--data", type=Path, help="PIE-Bench folder (mapping_file.json + annotation_images/)")
    p.add_argument("--model", help="diffusers model: hub id or local folder")
    p.add_argument("--solver", default="ees27", help="solver name (diffinv list-solvers; default ees27)")
    p.add_argument("--solver-option", action="append", default=[], metavar="K=V", help="solver option, e.g. gamma=0.96")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument(
        "--spacing",
        default="auto",
        help=f"grid spacing: {', '.join(SPACING_CHOICES)} (default auto: each solver on its reference grid, time "
        "for DDIM and the exactly reversible solvers, lambda for Runge-Kutta/EES; config.json records the one used)",
    )
    p.add_argument("--guidance", type=float, help="editing CFG scale (default 3; 7.5 with npi)")
    p.add_argument("--inversion-guidance", type=float, help="CFG scale while inverting (default: --guidance)")
    p.add_argument("--smoothing", nargs="*", default=[], help="smoothing strategies: npi, proximal, smooth-lora")
    p.add_argument("--editor-option", action="append", default=[], metavar="K=V", help="other Editor option")
    p.add_argument("--prompts", default="standard", help="prompt rule: standard, large-deviation, greyscale")
    p.add_argument("--dtype", default="auto", help="model dtype: auto, fp16, bf16, fp32, fp64")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", help="device (default: Accelerate's, i.e. this process's GPU, else CPU)")
    p.add_argument("--types", help="edit types to run, e.g. 0,1,2 (default: all)")
    p.add_argument("--ids", help="image ids to run, comma-separated")
    p.add_argument("--limit", type=int, help="only the first N selected images (id order)")
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
    add_weights_argument(p)
    p.add_argument("--preset", help="run a paper experiment (several runs, one folder each under --out)")
    p.add_argument("--only", help="with --preset: only these runs (comma-separated names)")
    p.add_argument("--list-presets", action="store_true", help="print the presets and their runs, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", type=Path, help="run folder (with --preset: the folder holding one folder per run)")
    p.set_defaults(func=run)


def _csv_list(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def run(args: argparse.Namespace) -> int:
    from ..bench import PRESETS, RunConfig, get_preset, run_bench

    if args.list_presets:
        for preset in PRESETS.values():
            print(f"{preset.name}: {preset.description}")
            for name, overrides in preset.runs.items():
                print(f"  {name}: {json.dumps(overrides, sort_keys=True)}")
        return 0
    for need in ("data", "model", "out"):
        if getattr(args, need) is None:
            raise UsageError(f"--{need} is required")
    types = _csv_list(args.types)
    try:
        types_int = None if types is None else [int(t) for t in types]
    except ValueError:
        raise UsageError(f"--types must be integers 0-9, got {args.types!r}") from None
    base = {
        "model": args.model,
        "solver": args.solver,
        "solver_options": parse_key_values(args.solver_option, "--solver-option"),
        "steps": args.steps,
        "spacing": args.spacing,
        "guidance": args.guidance,
        "inversion_guidance": args.inversion_guidance,
        "smoothing": args.smoothing,
        "editor_options": parse_key_values(args.editor_option, "--editor-option"),
        "dtype": args.dtype,
        "seed": args.seed,
        "prompts": args.prompts,
        "metrics": args.metrics,
        "reconstruct": not args.no_reconstruct,
    }
    if args.preset is None:
        runs = [(args.out, base)]
    else:
        preset = get_preset(args.preset)
        only = _csv_list(args.only)
        unknown = sorted(set(only or []) - set(preset.runs))
        if unknown:
            raise UsageError(f"preset {preset.name} has no run {', '.join(unknown)}; see --list-presets")
        runs = [(args.out / name, {**base, **o}) for name, o in preset.runs.items() if only is None or name in only]
    for out, settings in runs:
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
        )
        print(table)
    return 0
