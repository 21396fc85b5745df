"""Item 3: round-trip error and edit quality against the total number of model calls, on the analytic model."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from common import Section, TimedModel, md_table

from diffinv import generate, get_solver, invert, list_solvers
from diffinv.demo import DemoConfig, grid_timesteps, run_demo, solver_spacing

STEPS = (4, 8, 16, 32, 64)
BUDGETS = (50, 100, 200, 400)
PSNR_CAP = 100.0  # exactly reversible solvers keep the background to ~300 dB (round-off)


def count_nfe(solver: str, steps: int, schedule: Any) -> int:
    """Model calls of invert + generate on the demo's grid for ``solver`` (counted, not computed)."""
    slv = get_solver(solver)
    model = TimedModel(lambda x, t: torch.zeros_like(x))
    ts = grid_timesteps(schedule, steps, solver_spacing(slv))
    generate(model, invert(model, torch.zeros(1, 1), schedule, solver=slv, timesteps=ts))
    return model.calls


def _plot(points: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    panels = [
        ("roundtrip_rmse", "round-trip RMSE (reconstruction)", True),
        ("reference_rmse", "edit RMSE to a converged edit", True),
        ("background_psnr", f"background PSNR of edits (dB, capped at {PSNR_CAP:g})", False),
    ]
    styles = ["-", "--", ":", "-."]
    for n, (solver, pts) in enumerate(points.items()):
        for ax, (key, title, log) in zip(axes, panels):
            xs = [p["nfe"] for p in pts if math.isfinite(p[key])]
            ys = [max(p[key], 1e-16) if log else min(p[key], PSNR_CAP) for p in pts if math.isfinite(p[key])]
            ax.plot(xs, ys, styles[n // 10], marker="o", ms=3, label=solver)
            ax.set_xscale("log")
            if log:
                ax.set_yscale("log")
            ax.set_title(title)
            ax.set_xlabel("total NFE (invert + generate)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Quality per NFE on the analytic toy scenes (exact model): pick a solver for a budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quality_section(plot_path: Path, link: str, images: int = 2) -> Section:
    start = time.perf_counter()
    points: dict[str, list[dict[str, float]]] = {s: [] for s in list_solvers()}
    schedule = None
    for steps in STEPS:
        result = run_demo(DemoConfig(steps=steps, images=images, reference_steps=200), progress=False)
        schedule = result.scenes.schedule
        for run in result.runs:
            row = run.row
            nfe = count_nfe(row["solver"], steps, schedule)
            points[row["solver"]].append({"steps": steps, "nfe": nfe, **{k: float(row[k]) for k in row if k in KEYS}})
    _plot(points, plot_path)

    def cell(p: dict[str, float]) -> str:
        return f"{p['nfe']}: {p['roundtrip_rmse']:.1e} / {p['reference_rmse']:.1e}"

    rows = [[s, *(cell(p) for p in pts)] for s, pts in points.items()]
    pick = []
    for budget in BUDGETS:
        best = {}
        for exact in (False, True):
            within = [
                (p["reference_rmse"], s, p)
                for s, pts in points.items()
                for p in pts
                if p["nfe"] <= budget and get_solver(s).exact == exact and math.isfinite(p["reference_rmse"])
            ]
            best[exact] = min(within, default=None, key=lambda c: c[0])
        pick.append(
            [
                budget,
                *(f"{c[1]} ({c[2]['steps']} steps: {cell(c[2])})" if c else "-" for c in (best[False], best[True])),
            ]
        )
    body = [
        "The demo's problem (`diffinv demo`): toy-scene images with an exact guided eps (CFG 3), inverted under "
        "the source prompt and generated under the source (round trip) and under every other prompt (edits); "
        "each solver on its own grid (`diffinv.demo.solver_spacing`). Edit error = RMSE to a converged edit "
        f"(RK4, 200 steps). {images} images, steps {', '.join(map(str, STEPS))}; NFE counted.",
        "",
        f"![quality per NFE]({link})",
        "",
        "**Best edit error within a budget of total NFE** (cell: `NFE: round-trip RMSE / edit RMSE`):",
        "",
        md_table(["NFE budget", "any solver", "exactly reversible solver"], pick),
        "",
        "<details><summary>All points (cell: NFE: round-trip RMSE / edit RMSE)</summary>",
        "",
        md_table(["solver", *(f"{s} steps" for s in STEPS)], rows),
        "",
        "</details>",
    ]
    return Section("3. Quality per NFE", "\n".join(body), [], time.perf_counter() - start)


KEYS = ("roundtrip_rmse", "reference_rmse", "background_psnr", "align_acc")
