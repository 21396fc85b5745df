"""The EES round-trip investigation on the shipped digits model (docs/digits-roundtrip.md).

    python scripts/digits_roundtrip.py probe           # the network along t between integer timesteps
    python scripts/digits_roundtrip.py steps [NAME..]  # round trip vs steps (default: every registered solver)
    python scripts/digits_roundtrip.py variants        # EES with other nodes / time inputs
    python scripts/digits_roundtrip.py members         # EES(2,5;x) and EES(2,7;x) over x: error vs node asymmetry
    python scripts/digits_roundtrip.py lowpass         # default EES on a Gaussian-low-passed time embedding
    python scripts/digits_roundtrip.py fine            # default EES vs RK4 with steps finer than one timestep
    python scripts/digits_roundtrip.py tinysd          # the same solvers on the random-weight SD test UNet

Float64 weights and state, lambda grid, source digits 3, invert and generate under the same guided model.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time

import torch

from diffinv.models.digits import load_digits_model
from diffinv.solve import generate, invert
from diffinv.solvers import list_solvers
from diffinv.tableaux import ees25, ees27

torch.set_num_threads(1)
MODEL = load_digits_model(torch.float64)
IMAGES = 2
SYM27 = (2 - 2**0.5) / 4  # the EES(2,7) member with symmetric nodes


def roundtrip(solver: str, steps: int, w: float, time_input: str = "exact", spacing: str = "lambda", **opts) -> float:
    """Round-trip RMSE of ``IMAGES`` shipped 3s (pixels in [-1, 1])."""
    x0 = MODEL.sources(3, IMAGES).double()
    eps = MODEL.eps(3, w, time_input)
    inv = invert(eps, x0, MODEL.schedule, solver=solver, steps=steps, spacing=spacing, **opts)
    return (generate(eps, inv) - x0).pow(2).mean().sqrt().item()


def probe() -> None:
    """eps at x_t for t on a 1/20 sub-grid of [t0, t0 + 2]: its departure from the chord between integers."""
    gen = torch.Generator().manual_seed(0)
    x0 = MODEL.sources(3, 1).double()
    for t0 in (100, 300, 600, 900):
        a, s = MODEL.schedule.alpha(t0).item(), MODEL.schedule.sigma(t0).item()
        xt = a * x0 + s * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        y = torch.tensor([3])
        ts = torch.arange(0, 41, dtype=torch.float64) / 20 + t0
        e = torch.stack([MODEL.raw_eps(xt, t, y)[0] for t in ts])
        k = torch.arange(41) // 20 * 20
        k = torch.clamp(k, max=20)
        lo, hi = e[k], e[torch.clamp(k + 20, max=40)]
        frac = ((ts - ts[k]) / 1.0).view(-1, 1, 1, 1)
        chord = lo + frac * (hi - lo)
        dev = (e - chord).flatten(1).norm(dim=1).max().item()
        step = (e[20] - e[0]).norm().item()
        size = e[0].norm().item()
        print(
            f"t0={t0}: |eps|={size:.3g}  |eps(t0+1)-eps(t0)|={step:.3g}  max |eps(t)-chord|={dev:.3g}"
            f"  ratio={dev / step:.2f}",
            flush=True,
        )


def steps_table(*names: str) -> None:
    for w in (1.0, 3.0):
        for solver in names or list_solvers():
            row = []
            for n in (25, 50, 100):
                row.append(roundtrip(solver, n, w))
            print(f"w={w:g} {solver:9s} " + "  ".join(f"{v:.2e}" for v in row), flush=True)


def variants() -> None:
    cases = [
        ("ees27", {}, "exact"),
        ("ees27", {}, "round"),
        ("ees25", {}, "exact"),
        ("ees25", {}, "round"),
        ("ees27", {}, "lerp"),
        ("ees25", {"x": 0.25}, "exact"),  # nodes {0, 1/2, 1}
        ("ees27", {"x": SYM27}, "exact"),  # nodes {0, 1 - 1/sqrt2, 1/sqrt2, 1}
        ("ees27", {"x": 0.0}, "exact"),
        ("rk4", {}, "round"),
        ("rk4", {}, "lerp"),
    ]
    for w in (1.0, 3.0):
        for solver, opts, ti in cases:
            row = [roundtrip(solver, n, w, ti, **opts) for n in (25, 50, 100)]
            print(f"w={w:g} {solver:6s} {opts!s:12s} {ti:6s} " + "  ".join(f"{v:.2e}" for v in row), flush=True)


def asymmetry(nodes: tuple[float, ...]) -> float:
    """How far the stage times of a step are from symmetric (c <-> 1 - c): the Hausdorff distance between the sets
    {c} and {1 - c} on the circle t mod 1 (the grid ends 0 and 1 are one point: a stage there is shared with the
    neighbouring step). 0 for RK4, Heun, midpoint, EES(2,5;1/4), EES(2,7;0) and EES(2,7;(2-sqrt2)/4)."""

    def gap(a: float, b: float) -> float:
        d = abs(a - b) % 1.0
        return min(d, 1.0 - d)

    mirrored = [1.0 - c for c in nodes]
    return max(
        max(min(gap(c, m) for m in mirrored) for c in nodes),
        max(min(gap(m, c) for c in nodes) for m in mirrored),
    )


def members() -> None:
    """Round trip at w = 1 over the family parameter x: it collapses only where the nodes are symmetric."""
    families = {
        "ees25": (ees25, (0.1, 0.15, 0.2, 0.23, 0.25, 0.27, 0.3, 0.35)),
        "ees27": (ees27, (-0.1, -0.05, 0.0, 0.05, (5 - 3 * 2**0.5) / 14, 0.1, 0.13, SYM27, 0.16)),
    }
    for name, (family, xs) in families.items():
        for x in xs:
            nodes = family(x).c
            row = [roundtrip(name, n, 1.0, x=x) for n in (25, 50)]
            shown = ", ".join(f"{c:.3f}" for c in nodes)
            print(
                f"{name} x={x:+.4f} nodes ({shown})  asymmetry {asymmetry(nodes):.3f}  "
                + "  ".join(f"{v:.2e}" for v in row),
                flush=True,
            )


@contextlib.contextmanager
def lowpassed(width: float):
    """The network's sinusoidal time embedding averaged over t + N(0, width^2) timesteps: each frequency w is
    damped by exp(-(w width)^2 / 2), so the field is smooth in t on scales below ``width``."""
    proj = MODEL.unet.time_proj
    half = proj.num_channels // 2
    freqs = proj.scale * torch.exp(
        -math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - proj.downscale_freq_shift)
    )
    damp = torch.exp(-((freqs * width) ** 2) / 2).repeat(2)  # sin and cos halves share the frequencies
    plain = proj.forward

    def forward(t: torch.Tensor) -> torch.Tensor:
        emb = plain(t)
        return emb * damp.to(emb.dtype)

    proj.forward = forward
    try:
        yield damp
    finally:
        proj.forward = plain


def lowpass() -> None:
    """Default EES and RK4 round trips on the low-passed network, and how far the low-pass moves eps."""
    x0 = MODEL.sources(3, IMAGES).double()
    t = torch.tensor(500.0, dtype=torch.float64)
    xt = MODEL.schedule.alpha(t) * x0 + MODEL.schedule.sigma(t) * torch.randn(
        x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    y = torch.tensor([3] * IMAGES)
    plain = MODEL.raw_eps(xt, t, y)
    for width in (0.5, 1.0, 2.0, 4.0):
        with lowpassed(width) as damp:
            moved = ((MODEL.raw_eps(xt, t, y) - plain).norm() / plain.norm()).item()
            rows = {s: [roundtrip(s, n, 1.0) for n in (25, 50, 100)] for s in ("ees27", "ees25", "rk4")}
        kept = (damp[: len(damp) // 2] > 0.5).sum().item()
        print(
            f"width {width:g} timesteps: {kept}/{len(damp) // 2} frequencies kept above half, "
            f"eps moved {moved:.1%} at t=500",
            flush=True,
        )
        for s, row in rows.items():
            print(f"  {s:6s} " + "  ".join(f"{v:.2e}" for v in row), flush=True)


def fine() -> None:
    """Default EES against RK4 with steps down to below one timestep (lambda grid, w = 1)."""
    for n in (200, 400, 1000):
        row = {s: roundtrip(s, n, 1.0) for s in ("ees27", "ees25", "rk4")}
        print(f"{n:5d} steps  " + "  ".join(f"{s} {v:.2e}" for s, v in row.items()), flush=True)


def tinysd() -> None:
    """Relative latent round trip on the tests' tiny SD-architecture UNet (random weights, float64, default grid,
    no guidance): the same diffusers sinusoidal time embedding as Stable Diffusion's UNets."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root / "tests"), str(root / "benchmarks")]
    from common import UNetEps, latent
    from tiny import float64_copy, tiny_unet

    from diffinv.schedules import NoiseSchedule

    schedule = NoiseSchedule.scaled_linear()
    model = UNetEps(float64_copy(tiny_unet(sample_size=8)))
    x0 = latent(8, dtype=torch.float64)
    print("steps       10       20       50       100")
    for solver in ("ees27", "ees27_sym", "ees25", "ees25_sym", "rk4"):
        row = []
        for n in (10, 20, 50, 100):
            out = generate(model, invert(model, x0, schedule, solver=solver, steps=n))
            row.append((out - x0).norm().item() / x0.norm().item())
        print(f"{solver:10s} " + "  ".join(f"{v:.1e}" for v in row), flush=True)


if __name__ == "__main__":
    start = time.perf_counter()
    commands = {"probe": probe, "steps": steps_table, "variants": variants, "members": members, "lowpass": lowpass}
    commands |= {"fine": fine, "tinysd": tinysd}
    commands[sys.argv[1]](*sys.argv[2:])
    print(f"({time.perf_counter() - start:.0f} s)")
