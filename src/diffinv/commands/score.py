"""``diffinv score``: compute the metrics a bench run lacks from its saved images, without the diffusion model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import add_weights_argument


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "score",
        help="compute the missing metrics of bench runs from their saved images (no diffusion model)",
        description="Score the done images of each RUN folder with the metrics their records lack, from the "
        "saved edited/ and recon/ PNGs and the data set, then rebuild metrics.csv. Resumable, and safe beside a "
        "'diffinv bench' writing the same folder. recon_latent_rmse needs the model: only bench computes it.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        type=Path,
        metavar="RUN",
        help="a run folder (holding config.json), or a folder of runs (a preset's --out)",
    )
    p.add_argument(
        "--metrics",
        default="all",
        help="comma-separated subset of structure_distance,psnr,lpips,mse,ssim,clip_whole,clip_edited (default all)",
    )
    p.add_argument("--data", type=Path, help="PIE-Bench folder (default: the one in the run's config.json)")
    add_weights_argument(p)
    p.add_argument("--device", help="device of the metric networks (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run_folders(paths: list[Path]) -> list[Path]:
    """The run folders named: each path itself if it holds ``config.json``, else its subfolders that do."""
    from ..bench.runner import CONFIG_FILE, read_run

    out = []
    for path in paths:
        runs = [path] if (path / CONFIG_FILE).is_file() or not path.is_dir() else []
        runs = runs or sorted(d for d in path.iterdir() if (d / CONFIG_FILE).is_file())
        for folder in runs or [path]:
            read_run(folder)  # every folder is a run before any is scored
            out.append(folder)
    return out


def run(args: argparse.Namespace) -> int:
    from ..bench import score_run
    from ..metrics import parse_metrics

    parse_metrics(args.metrics)  # a typo fails before any work
    for folder in run_folders(args.runs):
        options = {"data": args.data, "device": args.device, "weights": args.weights}
        print(score_run(folder, args.metrics, progress=not args.no_progress, **options))
    return 0
