"""Items 1 and 2a: solver overhead per model call, and our DDIM against a loop over diffusers' schedulers."""

from __future__ import annotations

import time
from typing import Any

import torch
from common import (
    Paired,
    Section,
    Target,
    TimedModel,
    Timing,
    UNetEps,
    fmt_s,
    latent,
    md_table,
    rel_err,
    sd_ddim_scheduler,
    time_it,
    time_paired,
    tiny_unet,
    toy_problem,
)

from diffinv import NoiseSchedule, SolverDivergence, generate, get_solver, invert, list_solvers

STEPS = 50
OVERHEAD_TARGET = 1.05


def _round_trip(model: Any, x: torch.Tensor, schedule: NoiseSchedule, solver: str, steps: int = STEPS) -> Any:
    inv = invert(model, x, schedule, solver=solver, steps=steps)
    return generate(model, inv)


def _isolated_call(model: Any, x: torch.Tensor, repeat: int) -> Timing:
    """One model call at a mid-range timestep, timed ``repeat`` times."""
    t = torch.tensor(500.0)
    timing, _ = time_it(lambda: model(x, t), repeat, warmup=3)
    return timing


def measure_overhead(name: str, model: Any, x: torch.Tensor, schedule: NoiseSchedule, repeat: int) -> dict[str, Any]:
    """Every solver's invert + generate on one model: wall time, NFE, time inside the model, ratios."""
    with torch.inference_mode():
        iso = _isolated_call(model, x, repeat=max(10, 3 * repeat))
        rows = []
        for solver in list_solvers():
            timed = TimedModel(model)
            walls, inside, nfe, diverged = [], [], 0, False
            try:
                _round_trip(timed, x, schedule, solver, steps=3)  # warm up this solver's code paths
                for _ in range(repeat):
                    timed.reset()
                    start = time.perf_counter()
                    _round_trip(timed, x, schedule, solver)
                    walls.append(time.perf_counter() - start)
                    inside.append(timed.seconds)
                    nfe = timed.calls
            except SolverDivergence:
                diverged = True
            ratios = [w / m for w, m in zip(walls, inside)]
            rows.append(
                {
                    "model": name,
                    "solver": solver,
                    "nfe": nfe,
                    "wall": Timing(walls),
                    "ratio": Timing(ratios),
                    "overhead_per_nfe": Timing([(w - m) / nfe for w, m in zip(walls, inside)]) if nfe else None,
                    "iso_ratio": (Timing(walls).median / (nfe * iso.median)) if nfe else float("nan"),
                    "diverged": diverged,
                }
            )
    return {"name": name, "call": iso, "rows": rows}


def overhead_section(repeat_analytic: int, repeat_unet: int, sizes: tuple[int, ...] = (8, 32)) -> Section:
    start = time.perf_counter()
    scenes, toy, sources = toy_problem()
    results = [measure_overhead("analytic (toy scenes, 4x3x16x16)", toy, sources, scenes.schedule, repeat_analytic)]
    schedule = NoiseSchedule.scaled_linear()
    for size in sizes:
        model = UNetEps(tiny_unet(sample_size=size))
        results.append(measure_overhead(f"tiny UNet {size}x{size}", model, latent(size), schedule, repeat_unet))

    body = [
        f"Invert + generate, {STEPS} steps each, every registered solver, in `torch.inference_mode()`. "
        "**ratio** = wall time / time spent inside the model calls of the same run (= NFE x the mean model "
        "call of that run); **overhead/NFE** = (wall - model time) / NFE, i.e. what the solver, the grid, "
        "`Field` and the divergence check add per model call; **ratio vs isolated call** = median wall / "
        "(NFE x median of a model call timed alone before the runs). min / median over the repeats "
        f"(analytic: {repeat_analytic}, UNet: {repeat_unet}).",
        "",
    ]
    targets = []
    for res in results:
        body.append(f"**{res['name']}**: one model call (timed alone) {res['call']} (min / median)")
        body.append("")
        table = []
        for r in res["rows"]:
            if r["diverged"] or not r["nfe"]:
                table.append([r["solver"], "diverged", "", "", "", ""])
                continue
            table.append(
                [
                    r["solver"],
                    r["nfe"],
                    str(r["wall"]),
                    f"{r['ratio'].min:.3f} / {r['ratio'].median:.3f}",
                    f"{fmt_s(r['overhead_per_nfe'].min)} / {fmt_s(r['overhead_per_nfe'].median)}",
                    f"{r['iso_ratio']:.3f}",
                ]
            )
        header = ["solver", "NFE", "wall (min / median)", "ratio", "overhead/NFE", "ratio vs isolated call"]
        body += [md_table(header, table), ""]
    unet32 = [r for r in results[-1]["rows"] if r["nfe"]]
    if unet32 and results[-1]["name"].endswith("32x32"):
        worst = max(unet32, key=lambda r: r["ratio"].median)
        holds = worst["ratio"].median <= OVERHEAD_TARGET and all(not r["diverged"] for r in results[-1]["rows"])
        targets.append(
            Target(
                "1",
                f"overhead ratio <= {OVERHEAD_TARGET} for every solver, tiny UNet 32x32",
                f"worst {worst['ratio'].median:.3f} ({worst['solver']})",
                holds,
            )
        )
    return Section("1. Solver overhead per model call", "\n".join(body), targets, time.perf_counter() - start)


# -- 2a: DDIM against diffusers' schedulers ---------------------------------------------------------


def _diffusers_schedulers(steps: int) -> tuple[Any, Any]:
    from diffusers import DDIMInverseScheduler

    sched = sd_ddim_scheduler()
    inverse = DDIMInverseScheduler.from_config(sched.config)
    sched.set_timesteps(steps)
    inverse.set_timesteps(steps)
    return sched, inverse


def comparison_row(what: str, calls: int, res: Paired, differ: float | None) -> list[Any]:
    """A row of the against-diffusers table."""
    return [
        what,
        calls,
        str(res.ours),
        str(res.theirs),
        f"{res.ratios.median:.3f}",
        f"{res.normalised_ratio:.3f}",
        "n/a" if differ is None else f"{differ:.1e}",
    ]


def diffusers_ddim_round_trip(model: Any, x: torch.Tensor, sched: Any, inverse: Any) -> torch.Tensor:
    """What a diffusers user writes: DDIM inversion, then DDIM generation, one model call per step."""
    for t in inverse.timesteps:
        x = inverse.step(model(x, t), t, x).prev_sample
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
    return x


def ddim_vs_diffusers(pairs: int, sizes: tuple[int, ...] = (8, 32)) -> tuple[list[list[Any]], list[Target]]:
    """Our DDIM (same grid and inversion convention as DDIMInverseScheduler) vs the diffusers loop."""
    sched, inverse = _diffusers_schedulers(STEPS)
    schedule = NoiseSchedule.from_scheduler(sched)
    grid = [*sched.timesteps.tolist(), 0]  # 981, 961, ..., 1, 0 (tests/test_parity_diffusers.py)
    ddim = get_solver("ddim", inversion_timestep="target")
    cases = [(f"tiny UNet {size}x{size}", UNetEps(tiny_unet(sample_size=size)), latent(size), pairs) for size in sizes]
    cases.append(("trivial model `0.1 x` (the loops' own cost), 64x64", lambda x, t: 0.1 * x, latent(64), 20))
    rows, targets = [], []
    for what, model, x, n in cases:
        timed = TimedModel(model)
        with torch.inference_mode():
            res = time_paired(
                lambda x=x, m=timed: generate(m, invert(m, x, schedule, solver=ddim, timesteps=grid)),
                lambda x=x, m=timed: diffusers_ddim_round_trip(m, x, sched, inverse),
                n,
                inside=lambda m=timed: m.seconds,
            )
        rows.append(comparison_row(f"DDIM invert + generate, {what}", 2 * STEPS, res, rel_err(*res.outputs)))
        ratio = res.normalised_ratio
        targets.append(Target("2", f"our DDIM / diffusers DDIM loop <= 1.0, {what}", f"{ratio:.3f}", ratio <= 1.0))
    return rows, targets
