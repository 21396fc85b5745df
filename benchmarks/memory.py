"""Item 5: peak memory of invert + generate against the number of steps, and the exact solvers' extra state.

Method: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free made by
torch's CPU allocator, with its size and time. Replaying them in time order gives the bytes that
torch tensors held at every moment of the run; the peak of that curve, above what was live when the
run started (the model's weights, the input latent), is the figure reported. It counts tensor
storage only: Python objects (floats in the grid caches) and allocator slack are not included, and
tracemalloc would miss the tensors entirely.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from common import Section, Target, UNetEps, latent, md_table, tiny_unet
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from diffinv import NoiseSchedule, generate, invert, list_solvers

STEP_COUNTS = (10, 50, 200)
FLAT_TOLERANCE = 0.05


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the bytes held by torch CPU tensors allocated while ``fn`` runs (see the module docstring)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if e.device_type() == DeviceType.CPU:
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def _linear_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in model with one output allocation, so that the peak is the solver's own memory."""
    return 0.1 * x


def _run(model: Any, x: torch.Tensor, schedule: NoiseSchedule, solver: str, steps: int) -> dict[str, int]:
    extra: dict[str, int] = {}

    def go() -> None:
        # No divergence check: EDICT drifts away on long grids, and only the memory matters here.
        inv = invert(model, x, schedule, solver=solver, steps=steps, divergence_limit=None)
        extra["state"] = sum(v.nbytes for k, v in inv.state.tensors().items() if k != "x")
        generate(model, inv, divergence_limit=None)

    with torch.inference_mode():
        extra["peak"] = peak_bytes(go)
    return extra


def memory_section(unet_solvers: tuple[str, ...] = ("ddim", "bdia")) -> Section:
    start = time.perf_counter()
    schedule = NoiseSchedule.scaled_linear()
    x = latent(64)  # SD 1.5's 512x512 latent
    unit = x.nbytes
    rows, targets, worst = [], [], (0.0, "")
    for solver in list_solvers():
        runs = [_run(_linear_eps, x, schedule, solver, n) for n in STEP_COUNTS]
        peaks = [r["peak"] for r in runs]
        spread = max(peaks) / min(peaks) - 1
        worst = max(worst, (spread, solver))
        rows.append(
            [solver, *(f"{p / unit:.2f}" for p in peaks), f"{100 * spread:.1f} %", f"{runs[1]['state'] / unit:g}"]
        )
    body = [
        __doc__.split("\n\n", 1)[1].strip().replace("\n", " "),
        "",
        f"**Solver memory** (model `eps = 0.1 x`, one 1x4x64x64 float32 latent = {unit // 1024} KiB = 1 unit): "
        "peak in latent units at each step count; *extra state* = the bytes of the inverted state's tensors "
        "besides `x` (EDICT's partner latent, BDIA/BELM's neighbour, McCallum-Foster/Rex's `z`, reversible "
        "Heun's `z` and cached slope).",
        "",
        md_table(
            ["solver", *(f"peak, {n} steps" for n in STEP_COUNTS), "max / min - 1", "extra state (latents)"], rows
        ),
        "",
        "The few hundred bytes that do grow with the steps are the grid itself (a few float64 per timestep while "
        "it is built); nothing is kept per step.",
        "",
    ]
    unet_rows = []
    unet = UNetEps(tiny_unet(sample_size=8))
    x8 = latent(8)
    for solver in unet_solvers:
        peaks = [_run(unet, x8, schedule, solver, n)["peak"] for n in STEP_COUNTS]
        spread = max(peaks) / min(peaks) - 1
        worst = max(worst, (spread, f"{solver} (UNet)"))
        unet_rows.append([solver, *(f"{p / 2**20:.2f}" for p in peaks), f"{100 * spread:.1f} %"])
    body += [
        "**With the tiny UNet** (8x8 latent, `torch.inference_mode()`): peak MiB above the weights; "
        "the UNet's activations dominate, and nothing accumulates over steps.",
        "",
        md_table(["solver", *(f"{n} steps (MiB)" for n in STEP_COUNTS), "max / min - 1"], unet_rows),
        "",
        "Run `invert`/`generate` under `torch.inference_mode()` (or `no_grad`) when the model has trainable "
        "parameters, as the Editor and CLI do: the library does not disable autograd itself (gradients through "
        "the solve are a feature), and with autograd on every step's graph is kept alive until the end.",
    ]
    targets.append(
        Target(
            "5",
            f"peak memory flat in steps (within {100 * FLAT_TOLERANCE:.0f} %)",
            f"worst {100 * worst[0]:.1f} % ({worst[1]})",
            worst[0] <= FLAT_TOLERANCE,
        )
    )
    return Section("5. Memory", "\n".join(body), targets, time.perf_counter() - start)
