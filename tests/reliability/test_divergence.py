"""Divergence: every solver names itself, the step and the timestep; the editor, the benchmark, the report
and ``diffinv edit`` carry it through (recorded as diverged, counted, or one line and exit 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import diffinv
from diffinv import SolverDivergence
from diffinv.analytic import GaussianMixture
from diffinv.bench import PieBench, RunConfig, run_bench
from diffinv.bench.report import find_runs, summarize
from diffinv.solvers import list_solvers

from .common import assert_one_line_error, cheap_metrics, read_table, run_cli

SCHED = diffinv.NoiseSchedule.scaled_linear()
STEPS = 10


def _mixture() -> GaussianMixture:
    g = torch.Generator().manual_seed(0)
    means = torch.randn(2, 2, 3, generator=g, dtype=torch.float64)
    return GaussianMixture(SCHED, means, torch.full((2, 2, 3), 0.3, dtype=torch.float64), torch.tensor([0.6, 0.4]))


MIX = _mixture()


def blowing_up(after: float, inverting: bool, value: float):
    """The mixture's eps, times ``value`` (or NaN) once the solver has passed timestep ``after``."""

    def eps(x: torch.Tensor, t) -> torch.Tensor:
        past = float(t) >= after if inverting else float(t) <= after
        if not past:
            return MIX(x, t)
        return torch.full_like(x, math.nan) if math.isnan(value) else MIX(x, t) * value

    return eps


@pytest.mark.parametrize("value", [1e9, math.nan], ids=["huge", "nan"])
@pytest.mark.parametrize("solver", list_solvers(SCHED))
def test_every_solver_reports_where_it_diverged(solver, value):
    x0 = MIX.sample(2, generator=torch.Generator().manual_seed(1))
    grid = diffinv.make_grid(SCHED, STEPS, "lambda")
    # Inverting: grid indices STEPS .. 0; step n (1-based) ends at grid index STEPS - n.
    with pytest.raises(SolverDivergence) as info:
        diffinv.invert(blowing_up(500.0, True, value), x0, SCHED, solver=solver, steps=STEPS)
    err = info.value
    assert err.solver == solver and 1 <= err.step <= STEPS
    assert err.timestep == float(grid[STEPS - err.step]) and err.timestep >= 500.0
    first = min(k for k in range(STEPS + 1) if grid[k] >= 500.0)  # the first grid point past 500, inverting
    assert STEPS - err.step >= first - 2  # caught within two steps of the blow-up
    message = str(err)
    assert f"solver {solver} diverged at step {err.step} (timestep {err.timestep:.4g})" in message
    assert ("non-finite" in message) == math.isnan(value) or "non-finite" in message

    # Generating: step n ends at grid index n.
    inv = diffinv.invert(MIX, x0, SCHED, solver=solver, steps=STEPS)
    with pytest.raises(SolverDivergence) as info:
        diffinv.generate(blowing_up(300.0, False, value), inv)
    err = info.value
    assert err.solver == solver and err.timestep == float(grid[err.step]) and err.timestep <= 300.0
    last = max(k for k in range(STEPS + 1) if grid[k] > 300.0)
    assert err.step <= last + 3


def test_divergence_limit_is_the_threshold():
    x0 = MIX.sample(1, generator=torch.Generator().manual_seed(2))
    big = blowing_up(0.0, True, 50.0)  # latents of a few hundred, finite
    with pytest.raises(SolverDivergence, match=r"max \|x\| = "):
        diffinv.invert(big, x0, SCHED, solver="ddim", steps=STEPS, divergence_limit=10.0)
    out = diffinv.invert(big, x0, SCHED, solver="ddim", steps=STEPS, divergence_limit=None)  # check off
    assert torch.isfinite(out.latent).all()
    with pytest.raises(ValueError):
        diffinv.invert(big, x0, SCHED, solver="ddim", steps=STEPS, divergence_limit=float("nan"))


class ExplodingEditor(diffinv.Editor):
    """A real Editor whose UNet output explodes below timestep 600 when the source prompt says 'space suit'."""

    boom = False

    def invert(self, image, prompt, generator=None):
        self.boom = "space suit" in str(prompt)
        return super().invert(image, prompt, generator)

    def unet_eps(self, x, t, cond):
        eps = super().unet_eps(x, t, cond)
        return eps * 1e12 if self.boom and float(t) < 600 else eps


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_editor_raises_and_bench_records_and_report_counts(tiny_pipe, pie_data, tmp_path, capsys):
    editor = ExplodingEditor(tiny_pipe, solver="ees27", steps=4, device="cpu", progress=False)
    image = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    with pytest.raises(SolverDivergence, match=r"solver ees27 diverged at step \d+ \(timestep"):
        editor.invert(image, "a woman in a space suit")
    inv = editor.invert(image, "a cat")  # fine without the trigger
    editor.boom = True
    with pytest.raises(SolverDivergence, match="ees27"):
        editor.edit(inv, ["a dog"])

    # The benchmark records the image as diverged and keeps going; the report counts it.
    config = RunConfig(model="tiny", solver="ees27", steps=4, metrics=["mse", "clip_whole"])
    out = tmp_path / "run"

    def factory(config, device):
        return ExplodingEditor(tiny_pipe, solver=config.solver, steps=config.steps, device="cpu", progress=False)

    table = run_bench(config, pie_data, out, editor_factory=factory, metrics=cheap_metrics, progress=False)
    rows = read_table(table)
    header, body = rows[0], rows[1:]
    assert len(body) == 6
    diverged = [r for r in body if r[header.index("diverged")] == "1"]
    assert len(diverged) == 1 and diverged[0][header.index("mse")] == "nan"
    assert diverged[0][0] == PieBench(pie_data)[0].id  # the astronaut ("a woman in a space suit")
    finished = [r for r in body if r[header.index("diverged")] == "0" and r[header.index("editing_type_id")] != "9"]
    assert len(finished) == 4 and all(math.isfinite(float(r[header.index("mse")])) for r in finished)
    summary = summarize(find_runs([out])[0].records)
    assert summary["n"] == 6 and summary["diverged"] == 1

    code, _, err = run_cli(["report", str(out), "--out", str(tmp_path / "report"), "--no-plots"])
    assert code == 0, err
    md = (tmp_path / "report" / "report.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| run |") and "diverged" in line)
    cols = [c.strip() for c in head.strip("|").split("|")]
    row = next(line for line in md.splitlines() if line.startswith("| run | ees27"))
    assert [c.strip() for c in row.strip("|").split("|")][cols.index("diverged")] == "1"


def test_cli_edit_divergence_is_one_line_exit_1(tiny_model, tmp_path, monkeypatch):
    unet_eps = diffinv.Editor.unet_eps
    monkeypatch.setattr(diffinv.Editor, "unet_eps", lambda self, x, t, cond: unet_eps(self, x, t, cond) * 1e12)
    src = tmp_path / "in.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(src)
    argv = ["edit", str(src), "--source", "a", "--target", "b", "--model", str(tiny_model), "--steps", "3"]
    code, _, err = run_cli([*argv, "--solver", "bdia", "--no-progress", "--device", "cpu"])
    line = assert_one_line_error(code, err, 1)
    assert "solver bdia diverged at step" in line and "timestep" in line
    assert not (tmp_path / "in_edit.png").exists()
    # --debug shows the traceback instead
    with pytest.raises(SolverDivergence):
        diffinv.cli.main(["--debug", *argv, "--solver", "bdia", "--no-progress", "--device", "cpu"])
