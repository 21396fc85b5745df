"""``diffinv weights``: fill and check a folder of the metric networks' weights, for air-gapped runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..cli import CommandError, UsageError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "weights",
        help="download or check the metric weights folder (DINO, CLIP, LPIPS) for offline benchmarks",
        description="The metrics' pretrained networks in one folder, to pass as --weights DIR (or DIFFINV_WEIGHTS). "
        "'download' needs the internet (the Hugging Face hub and download.pytorch.org); 'check' lists what is "
        "present and missing and exits 1 if anything is missing.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("download", "fill DIR with every backbone"), ("check", "list present / missing backbones")):
        a = actions.add_parser(name, help=text, description=text)
        a.add_argument("--dir", type=Path, help="weights folder (default: $DIFFINV_WEIGHTS)")
        a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..weights import BACKBONES, ENV, WeightsUnavailable, check_weights, download_weights, resolve_weights_dir

    root = resolve_weights_dir(args.dir)
    if root is None:
        raise UsageError(f"give --dir DIR (or set {ENV})")
    if args.action == "download":
        try:
            report = download_weights(root)
        except WeightsUnavailable as err:
            raise CommandError(str(err)) from None
    else:
        if not root.is_dir():
            raise UsageError(
                f"weights folder {root} does not exist (fill it with: diffinv weights download --dir {root})"
            )
        report = check_weights(root)
    for key, missing in report.items():
        b = BACKBONES[key]
        state = "present" if not missing else "missing"
        detail = f"{root / b.folder}" if not missing else f"{root / b.folder} lacks {', '.join(missing)}"
        print(f"{state:8} {b.name:26} for {','.join(b.metrics):30} {detail}")
    lacking = [BACKBONES[k].folder for k, m in report.items() if m]
    if lacking:
        raise CommandError(f"missing {', '.join(lacking)} in {root}: run 'diffinv weights download --dir {root}'")
    return 0
