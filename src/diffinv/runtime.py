"""How a loaded pipeline runs: CPU offload, VAE tiling and slicing, and a compiled denoiser.

Every option goes through diffusers' or torch's own mechanism, so it behaves as it does in diffusers:

* ``offload="model"``: :meth:`DiffusionPipeline.enable_model_cpu_offload` keeps each model (text encoders, UNet
  or transformer, VAE) on the CPU and moves it whole to the accelerator while it runs: SDXL in fp16 fits a
  12-16 GB card, at little cost per step since the denoiser stays on the accelerator during a solve.
  ``"sequential"``: :meth:`~DiffusionPipeline.enable_sequential_cpu_offload` streams every layer's weights in
  per call: the least memory, many times slower. The solver state stays on the accelerator either way.
* ``vae_tiling``/``vae_slicing``: the VAE encodes/decodes in overlapping tiles (large images) or one image
  at a time (large batches).
* ``compile``: :meth:`torch.nn.Module.compile` on the denoiser, in place, with ``mode=COMPILE_MODE`` unless a
  mode is named. ``"max-autotune-no-cudagraphs"`` is the default: CUDA graphs (``"reduce-overhead"``) would
  be re-recorded for every batch size and grid dtype a run uses (CFG batches, edits, reconstructions), which
  costs more than they save on a UNet call of tens of milliseconds. The first call of each input shape
  compiles (tens of seconds); ``benchmarks/gpu.py`` reports that cost apart from the steady-state figures.
  Results equal eager ones to float tolerance, not bitwise (fused kernels round differently): on the tiny
  UNet a float64 invert + edit agrees to 2e-7 relative, a float32 one to ~1e-4 (tests/test_runtime.py).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["COMPILE_MODE", "COMPILE_MODES", "OFFLOAD_CHOICES", "check_options", "configure", "execution_device"]

OFFLOAD_CHOICES = ("model", "sequential")
COMPILE_MODE = "max-autotune-no-cudagraphs"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_options(offload: str | None, compile: bool | str) -> str | None:
    """The compile mode (None: eager) after checking ``offload`` and ``compile``; ``ValueError`` if either is bad."""
    if offload is not None and offload not in OFFLOAD_CHOICES:
        raise ValueError(f"unknown offload {offload!r}; choose one of {', '.join(OFFLOAD_CHOICES)} (or None)")
    if isinstance(compile, str):
        if compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile!r}; choose one of {', '.join(COMPILE_MODES)}")
        return compile
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or a torch.compile mode, got {compile!r}")
    return COMPILE_MODE if compile else None


def configure(
    pipe: Any,
    denoiser: torch.nn.Module,
    device: torch.device | str | None,
    offload: str | None = None,
    vae_tiling: bool = False,
    vae_slicing: bool = False,
    compile: bool | str = False,
) -> None:
    """Apply the options to a loaded pipeline (in place). ``device``: the accelerator offload runs on."""
    mode = check_options(offload, compile)
    if offload is not None:
        target = torch.device(device) if device is not None else None
        if target is None:
            target = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if offload == "sequential" and target.type == "cpu":
            # accelerate's layer streaming needs an accelerator to stream to (on CPU it fails inside its hooks)
            raise ValueError("offload='sequential' needs a GPU (cuda/mps/xpu) to stream weights to; got device cpu")
        enable = pipe.enable_model_cpu_offload if offload == "model" else pipe.enable_sequential_cpu_offload
        enable(device=target)
    if vae_tiling:
        pipe.vae.enable_tiling()
    if vae_slicing:
        pipe.vae.enable_slicing()
    if mode is not None:
        denoiser.compile(mode=mode, dynamic=False)


def execution_device(pipe: Any, denoiser: torch.nn.Module) -> torch.device:
    """Where the denoiser computes: the offload device under CPU offload, else the denoiser's own device."""
    if getattr(pipe, "_offload_device", None) is not None or hasattr(denoiser, "_hf_hook"):
        return torch.device(pipe._execution_device)
    return denoiser.device
