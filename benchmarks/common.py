"""Shared pieces of the benchmark suite: timers, the machine description, the models under test."""

from __future__ import annotations

import datetime
import importlib.util
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]


# -- timing ----------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Repeated wall-clock samples of one measurement, in seconds."""

    samples: list[float] = field(default_factory=list)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def __str__(self) -> str:
        return f"{fmt_s(self.min)} / {fmt_s(self.median)}"


def fmt_s(seconds: float) -> str:
    """A duration with a unit that keeps 3 significant digits readable."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def time_it(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> tuple[Timing, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times timed; returns the timing and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    timing = Timing()
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        timing.samples.append(time.perf_counter() - start)
    return timing, out


@dataclass
class Paired:
    """Two ways of doing the same model calls, timed in adjacent pairs."""

    ours: Timing
    theirs: Timing
    ratios: Timing  # per pair, ours / theirs
    inside_ours: Timing  # seconds spent inside the model, per run
    inside_theirs: Timing
    outputs: tuple[Any, Any]

    @property
    def normalised_ratio(self) -> float:
        """``(M + o_ours) / (M + o_theirs)``: ``o`` = median of wall - model time, ``M`` = median model time.

        Both sides make identical model calls, so the model's share of the wall time differs between
        them only by the machine's noise; this estimate removes that noise and keeps the difference
        in everything else (the loops, the schedulers, prompt encoding, allocations).
        """
        over = [
            statistics.median(w - m for w, m in zip(t.samples, i.samples))
            for t, i in ((self.ours, self.inside_ours), (self.theirs, self.inside_theirs))
        ]
        model = statistics.median(self.inside_ours.samples + self.inside_theirs.samples)
        return (model + over[0]) / (model + over[1])


def time_paired(
    ours: Callable[[], Any], theirs: Callable[[], Any], pairs: int, inside: Callable[[], float] = lambda: 0.0
) -> Paired:
    """Time two ways of doing the same work in adjacent pairs (alternating which goes first).

    ``inside()``: a running total of seconds spent inside the model, shared by both sides. The median of
    the per-pair ratios is robust to the load drifting on a shared machine (it moves both runs of a pair).
    """
    outputs = (ours(), theirs())  # warm-up
    result = Paired(Timing(), Timing(), Timing(), Timing(), Timing(), outputs)
    sides = [(ours, result.ours, result.inside_ours), (theirs, result.theirs, result.inside_theirs)]
    for n in range(pairs):
        for fn, wall, model in sides if n % 2 == 0 else sides[::-1]:
            before, start = inside(), time.perf_counter()
            fn()
            wall.samples.append(time.perf_counter() - start)
            model.samples.append(inside() - before)
        result.ratios.samples.append(result.ours.samples[-1] / result.theirs.samples[-1])
    return result


class TimedModel:
    """Wraps ``eps(x, t)``, counting calls and the wall time spent inside them.

    The overhead ratio divides a run's wall time by the time its own model calls took, so both
    are measured under the same machine load (this 2-core machine is shared and noisy).
    """

    def __init__(self, model: Callable[[Tensor, Tensor], Tensor]):
        self.model = model
        self.calls = 0
        self.seconds = 0.0

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        start = time.perf_counter()
        out = self.model(x, t)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


class ModuleTimer:
    """Accumulates the wall time spent inside a torch module's forward (via hooks), e.g. a pipeline's UNet."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self._start = 0.0, 0.0
        self._hooks = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._leave)]

    def _enter(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _leave(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._start

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


# -- the machine -----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    """What the figures were measured on."""
    import os

    import diffusers

    try:
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "load average at start (1, 5, 15 min)": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "os": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)",
    }


# -- models ----------------------------------------------------------------------------------------


def _tests_tiny() -> Any:
    """``tests/tiny.py`` (tiny random diffusers models built from config), imported by path."""
    name = "diffinv_bench_tiny"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "tiny.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def tiny_unet(sample_size: int, dtype: torch.dtype = torch.float32) -> Any:
    """The tests' ~1M-parameter random SD-like UNet."""
    return _tests_tiny().tiny_unet(sample_size=sample_size, dtype=dtype)


def sd_ddim_scheduler() -> Any:
    """SD 1.x's DDIMScheduler, as the tests build it."""
    return _tests_tiny().sd_ddim_scheduler()


def tiny_sd_pipe() -> Any:
    """The tests' tiny random StableDiffusionPipeline (64x64 images, 8x8 latents)."""
    return _tests_tiny().tiny_sd_pipe()


class UNetEps:
    """``eps(x, t)`` of a UNet with a fixed random text context; input cast to the UNet's dtype and back.

    The random UNet's output is scaled by 0.1 so that no solver diverges on it (as the tests do).
    """

    def __init__(self, unet: Any, seed: int = 0):
        self.unet = unet
        gen = torch.Generator().manual_seed(seed)
        self.context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen).to(unet.dtype)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        ctx = self.context.expand(x.shape[0], -1, -1)
        out = self.unet(x.to(self.unet.dtype), t, encoder_hidden_states=ctx, return_dict=False)[0]
        return 0.1 * out.to(x.dtype)


def latent(size: int, batch: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32, channels: int = 4) -> Tensor:
    """A clean SD-like latent (about unit scale); SD3/FLUX latents have 16 channels."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=gen, dtype=torch.float64).to(dtype)


def toy_problem(images: int = 4, size: int = 16) -> tuple[Any, Callable[[Tensor, Tensor], Tensor], Tensor]:
    """The analytic model: toy scenes (exact guided eps of a Gaussian mixture), its schedule's owner and sources."""
    from diffinv.analytic import ToyScenes

    scenes = ToyScenes(size=size)
    model = scenes.guided("gray box", 3.0)
    sources = scenes.sample("gray box", images, generator=torch.Generator().manual_seed(0))
    return scenes, model, sources.float()


def rel_err(a: Tensor, b: Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius), in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Target:
    """One of the issue's pass/fail targets, with the measured value."""

    item: str
    what: str
    value: str
    holds: bool


@dataclass
class Section:
    """A benchmark section's markdown and the targets it checked."""

    title: str
    body: str
    targets: list[Target] = field(default_factory=list)
    seconds: float = 0.0
