"""The EES round-trip investigation on the shipped digits model (docs/digits-roundtrip.md).

    python scripts/digits_roundtrip.py probe           # the network along t between integer timesteps
    python scripts/digits_roundtrip.py steps           # round trip vs steps, every non-exact solver
    python scripts/digits_roundtrip.py variants        # EES with other nodes / time inputs

Float64 weights and state, lambda grid, source digits 3, invert and generate under the same guided model.
"""

from __future__ import annotations

import sys
import time

import torch

from diffinv.models.digits import load_digits_model
from diffinv.solve import generate, invert

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


def steps_table() -> None:
    for w in (1.0, 3.0):
        for solver in ("ees27", "ees25", "rk4", "heun", "midpoint", "dpmpp_2m", "ddim"):
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


if __name__ == "__main__":
    start = time.perf_counter()
    {"probe": probe, "steps": steps_table, "variants": variants}[sys.argv[1]]()
    print(f"({time.perf_counter() - start:.0f} s)")
