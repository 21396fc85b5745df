"""``diffinv edit``: invert a photo with Stable Diffusion and regenerate it under target prompts."""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..devices import check_device
from ..images import check_output_path, image_grid, load_image, psnr, save_image
from ..inversions import INVERSION_METHODS, check_method
from ..smoothing import SMOOTHINGS
from ..solvers import SPACING_CHOICES, get_solver
from . import add_runtime_arguments, parse_key_values, runtime_options
from .control import add_control_arguments, control_options

DTYPES = ("fp16", "bf16", "fp32")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "edit",
        help="edit a photo with text: invert it under --source, regenerate under each --target",
        description="Invert IMAGE with the source prompt, then generate it under each target prompt "
        "(one batched pass). Writes OUT (numbered OUT_1, OUT_2, ... for several targets) and, next to it, "
        "OUT's stem + .json: which file holds which target prompt, every setting, the seed and the versions "
        "(PNG outputs carry the same in a 'diffinv' text chunk).",
    )
    p.add_argument("image", metavar="IMAGE", help="the photo to edit (any format Pillow reads)")
    p.add_argument("--source", required=True, help="a prompt describing IMAGE")
    p.add_argument("--target", action="append", required=True, help="an edit prompt (repeat for several)")
    p.add_argument("--model", default=None, help="hub id or local folder (default: SD 1.5)")
    p.add_argument("--solver", default="ees27", help="solver name (see 'diffinv list-solvers'; default ees27)")
    p.add_argument(
        "--solver-option", action="append", default=[], metavar="KEY=VALUE", help="solver option (repeatable)"
    )
    p.add_argument("--steps", type=int, default=50, help="solver steps over the full range (default 50)")
    p.add_argument(
        "--spacing",
        choices=SPACING_CHOICES,
        default="auto",
        help="grid spacing (default auto: each solver on its reference grid, the diffusers time grid for DDIM and "
        "the exactly reversible solvers, lambda-uniform for Runge-Kutta/EES)",
    )
    p.add_argument("--strength", type=float, default=1.0, help="inversion depth in (0, 1] (default 1: full)")
    p.add_argument("--guidance", type=float, default=None, help="editing CFG scale (default 3; 7.5 with npi)")
    p.add_argument("--inversion-guidance", type=float, default=None, help="inversion CFG scale (default: --guidance)")
    p.add_argument(
        "--inversion",
        choices=INVERSION_METHODS,
        default="plain",
        help="plain (default: the solver's inversion at --inversion-guidance), null-text (Mokady et al.: per-step "
        "null embeddings optimised for --guidance) or direct (DirectInversion: per-step source-branch offsets; "
        "with --control p2p, any solver); null-text needs a one-step solver (ddim, euler, heun, rk4, ees25, ...)",
    )
    p.add_argument("--negative-prompt", default="", help="unconditional prompt (default: empty)")
    p.add_argument(
        "--smoothing", nargs="+", action="extend", choices=SMOOTHINGS, default=[], help="smoothing strategies"
    )
    p.add_argument("--lora", default=None, help="Smooth-Diffusion LoRA file or hub id (implies smooth-lora)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength (default 1)")
    p.add_argument("--lora-unmerged", action="store_true", help="apply the LoRA by forward hooks instead of merging it")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickled (.bin/.pt) model and LoRA weights, loaded as tensors only (default: safetensors only)",
    )
    p.add_argument("--resize", choices=("crop", "pad", "stretch"), default="crop", help="fit rule (default crop)")
    p.add_argument(
        "--dtype", choices=DTYPES, default=None, help="model dtype (default on CUDA fp16, bf16 for FLUX; else fp32)"
    )
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=None, help="sample the VAE posterior with this seed (default: mean)")
    p.add_argument("--out", default=None, help="output image (default: IMAGE's folder, <stem>_edit.png)")
    p.add_argument(
        "--grid",
        action="store_true",
        help="also reconstruct, print the reconstruction's PSNR and write OUT_grid: source | reconstruction | edits, "
        "captioned",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_control_arguments(p)
    add_runtime_arguments(p)
    p.set_defaults(func=run)


def output_paths(image: Path, out: str | None, count: int) -> list[Path]:
    """Where the edits go: ``out`` (or ``<stem>_edit.png``), numbered ``_1``... for several targets."""
    base = Path(out) if out else image.with_name(f"{image.stem}_edit.png")
    check_output_path(base)
    if count == 1:
        return [base]
    return [base.with_name(f"{base.stem}_{i + 1}{base.suffix}") for i in range(count)]


def _check_args(args: argparse.Namespace) -> None:
    if not args.source.strip():
        raise ValueError("--source prompt is empty")
    for t in args.target:
        if not t.strip():
            raise ValueError("--target prompt is empty")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if not (math.isfinite(args.strength) and 0 < args.strength <= 1):
        raise ValueError(f"--strength must be in (0, 1], got {args.strength}")
    for flag, value in (("--guidance", args.guidance), ("--inversion-guidance", args.inversion_guidance)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{flag} must be a finite number >= 0, got {value}")
    if not math.isfinite(args.lora_scale):
        raise ValueError(f"--lora-scale must be finite, got {args.lora_scale}")


def _check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and check that files can be written in it, before any model is loaded."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create output folder {folder}: {err.strerror or err}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {folder} is not writable")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..editor import DEFAULT_MODEL, Editor

    _check_args(args)
    control, p2p_options = control_options(args)
    image = Path(args.image)
    load_image(image)  # fail fast on a missing or corrupt file, before loading a model
    options = parse_key_values(args.solver_option, "--solver-option")
    # unknown solver or option, or an inversion it does not take: fail before loading a model
    check_method(args.inversion, get_solver(args.solver, **options), args.smoothing)
    paths = output_paths(image, args.out, len(args.target))
    grid_path = paths[0].with_name(f"{_stem(args, image)}_grid.png")
    for p in [*paths, *([grid_path] if args.grid else [])]:
        if p.resolve() == image.resolve():
            raise ValueError(f"output {p} would overwrite the input image")
        _check_writable(p.parent)
    check_device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype or "")
    generator = None
    if args.seed is not None:
        torch.manual_seed(args.seed)
        generator = torch.Generator("cpu").manual_seed(args.seed)  # a CPU generator: same draw on every device
    if args.no_progress:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()  # its "Loading weights" bar
    model = args.model or DEFAULT_MODEL
    with torch.no_grad():  # weights as normal tensors: null-text inversion differentiates through the UNet
        editor = Editor.from_pretrained(
            model,
            dtype=dtype,
            device=args.device,
            solver=args.solver,
            solver_options=options,
            steps=args.steps,
            spacing=args.spacing,
            strength=args.strength,
            guidance=args.guidance,
            inversion_guidance=args.inversion_guidance,
            negative_prompt=args.negative_prompt,
            smoothing=args.smoothing,
            lora=args.lora,
            lora_scale=args.lora_scale,
            lora_merge=not args.lora_unmerged,
            allow_pickle=args.allow_pickle,
            resize=args.resize,
            progress=not args.no_progress,
            **runtime_options(args),
        )
    with torch.inference_mode():  # everything else (null-text inversion turns gradients on for itself)
        record = _provenance(args, editor, model, image)
        inv = editor.invert(image, args.source, generator=generator, method=args.inversion)
        edits = editor.edit(inv, args.target, control=control, **p2p_options)
        if control is not None:  # the options as the control resolved them (defaults, [ ] markers)
            record["settings"].update(control=control, p2p_options=asdict(editor.control.options))
        record["outputs"] = {}
        for img, path, target in zip(edits, paths, args.target):
            # no creation time in the image: same inputs and seed give the same bytes
            chunk = {k: v for k, v in record.items() if k not in ("outputs", "created")} | {"target_prompt": target}
            save_image(img, path, text={"diffinv": json.dumps(chunk, sort_keys=True)})
            record["outputs"][path.name] = {"target_prompt": target}
            print(path)
        if args.grid:
            recon = editor.reconstruct(inv)[0]
            record["reconstruction_psnr"] = round(psnr(inv.images[0], recon), 4)
            captions = ["source", f"reconstruction, {record['reconstruction_psnr']:.2f} dB", *args.target]
            save_image(image_grid([inv.images[0], recon, *edits], captions=captions), grid_path)
            record["grid"] = grid_path.name
            print(f"reconstruction PSNR: {record['reconstruction_psnr']:.2f} dB")
            print(grid_path)
        sidecar = paths[0].with_name(f"{_stem(args, image)}.json")
        sidecar.write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
        print(sidecar)
    return 0


def _stem(args: argparse.Namespace, image: Path) -> str:
    """The stem that the numbered outputs, the grid and the sidecar share."""
    return Path(args.out).stem if args.out else f"{image.stem}_edit"


def _provenance(args: argparse.Namespace, editor: Any, model: str, image: Path) -> dict[str, Any]:
    """Everything that decided the outputs: the settings as the editor resolved them, the seed, the versions."""
    from ..provenance import editor_settings, record

    settings = editor_settings(editor, model, lora=args.lora, lora_merge=not args.lora_unmerged)
    settings.update(runtime_options(args), inversion=args.inversion)
    return record(str(image), args.source, settings, model, seed=args.seed)
