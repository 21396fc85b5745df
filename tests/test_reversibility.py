"""Reversibility: the one-step defect |Phi_{-h}(Phi_h(y)) - y| = O(h^p) with p each solver's ``reversal_order``.

Measured in float64 with the solver's own ``step`` then ``backward_step`` on a one-interval grid of
lambda-width h at lambda = -1 (noisy side, where the defects sit far above round-off down to h = 0.1,
even EES(2,7)'s ~1e-13), on the nonlinear Gaussian-mixture model. Low-order defects are fitted over
smaller steps (0.2 .. 0.05), where they are asymptotic in every form.
"""

import pytest
import torch
from helpers import (
    fitted_slope,
    max_abs,
    mixture,
    sd_schedule,
    smooth_schedule,
    start_points,
)

import diffinv
from diffinv.fields import Field
from diffinv.solvers import Grid

LAM0 = -1.0
HS_HIGH = (0.4, 0.2, 0.1)  # reversal order >= 6
HS_LOW = (0.2, 0.1, 0.05)
FORMS = ("t", "lambda-eps", "lambda-x", "sigma")
RK = ("euler", "heun", "midpoint", "ralston", "rk4", "ees25", "ees27")


def defect_slope(solver: diffinv.Solver, schedule, hs: tuple[float, ...] | None = None) -> tuple[float, list[float]]:
    """Fitted exponent of the one-step round-trip defect over three step sizes (in lambda; default by order)."""
    model = mixture(schedule)
    x = start_points(model, 4)
    if hs is None:
        hs = HS_HIGH if solver.reversal_order >= 6 else HS_LOW
    defects = []
    for h in hs:
        grid = Grid(schedule, schedule.timestep_of_lam(torch.tensor([LAM0, LAM0 + h], dtype=torch.float64)))
        field = Field(model, schedule)
        there = solver.step(field, grid, 0, solver.init_state(x, grid))
        back = solver.backward_step(field, grid, 0, there)
        defects.append(max_abs(back.x, x))
    assert min(defects) > 1e-14, f"defects {defects} too close to round-off"
    return fitted_slope(hs, defects), defects


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", RK)
def test_rk_reversal_order(name, form):
    solver = diffinv.get_solver(name, form=form)
    schedule = smooth_schedule() if form == "t" else sd_schedule()
    slope, defects = defect_slope(solver, schedule)
    assert abs(slope - solver.reversal_order) < 0.5, f"{name}/{form}: slope {slope:.2f} (defects {defects})"


def test_declared_reversal_orders():
    expected = {"euler": 2, "heun": 4, "midpoint": 4, "ralston": 4, "rk4": 6, "ees25": 6, "ees27": 8, "ddim": 2}
    assert {name: diffinv.get_solver(name).reversal_order for name in expected} == expected


@pytest.mark.parametrize("inversion_timestep", ["current", "target"])
def test_ddim_reversal_order(inversion_timestep):
    solver = diffinv.get_solver("ddim", inversion_timestep=inversion_timestep)
    slope, defects = defect_slope(solver, sd_schedule())
    assert abs(slope - solver.reversal_order) < 0.5, f"ddim/{inversion_timestep}: slope {slope:.2f} ({defects})"


def test_round_trip_ees_far_better_than_ddim_at_equal_nfe():
    sched = sd_schedule()
    model = mixture(sched)
    x0 = model.sample(4, generator=torch.Generator().manual_seed(3))
    errors = {}
    for name, steps in (("ees27", 50), ("ees25", 50), ("ddim", 200), ("ddim", 150)):
        inv = diffinv.invert(model, x0, sched, solver=name, steps=steps)
        errors[name, steps] = max_abs(diffinv.generate(model, inv), x0)
        assert inv.nfe == steps * inv.solver.nfe_per_step
    # Equal NFE: EES(2,7) 50 x 4 = DDIM 200 x 1, EES(2,5) 50 x 3 = DDIM 150 x 1.
    assert errors["ees27", 50] < 1e-3 * errors["ddim", 200], errors
    assert errors["ees25", 50] < 1e-2 * errors["ddim", 150], errors


def test_family_members_with_nodes_beyond_one_run_on_full_grids():
    """EES(2,7;x=0.2) has c4 = 1.067: the last stage of the last interval lies past t = 0 and is clamped there."""
    from diffinv.analytic import GaussianModel

    sched = diffinv.NoiseSchedule.scaled_linear()
    model = GaussianModel(sched, torch.full((2, 2, 2), 0.3), 0.05)
    x0 = model.sample(2, generator=torch.Generator().manual_seed(0))
    assert max(diffinv.ees27(0.2).c) > 1
    errs = []
    for steps in (25, 50):
        inv = diffinv.invert(model, x0, sched, solver="ees27", x=0.2, steps=steps)
        errs.append((diffinv.generate(model, inv) - x0).abs().max().item())
    assert errs[1] < errs[0] < 1e-3


# The members with symmetric stage times (nodes {0, 1/2, 1} and {0, 1-1/sqrt2, 1/sqrt2, 1}), which keep the round
# trip on a learned network (tests/test_digits.py, docs/digits-roundtrip.md): the same orders as the defaults.
SYMMETRIC = {"ees25": 0.25, "ees27": (2 - 2**0.5) / 4}


@pytest.mark.parametrize("name", SYMMETRIC)
def test_named_symmetric_members_are_the_x_option_and_listed(name, capsys):
    """``ees25_sym`` / ``ees27_sym`` are ``ees25 --solver-option x=0.25`` (resp. x = (2-sqrt2)/4), bit for bit."""
    from diffinv import cli
    from diffinv.analytic import GaussianModel
    from diffinv.commands import parse_key_values

    named = diffinv.get_solver(f"{name}_sym")
    option = diffinv.get_solver(name, **parse_key_values([f"x={SYMMETRIC[name]!r}"], "--solver-option"))
    assert named.tableau == option.tableau and named.options() == {"form": "lambda-x"}
    sched = sd_schedule()
    model = GaussianModel(sched, torch.zeros(2, 3, dtype=torch.float64), 0.5)
    x0 = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = diffinv.invert(model, x0, sched, solver=named, steps=8)
    b = diffinv.invert(model, x0, sched, solver=option, steps=8)
    assert torch.equal(a.latent, b.latent) and a.latent.abs().max() > 0
    assert cli.main(["list-solvers"]) == 0
    assert f"{name}_sym" in capsys.readouterr().out.split()


@pytest.mark.parametrize("form", ("lambda-x", "t"))
@pytest.mark.parametrize("name", SYMMETRIC)
def test_symmetric_ees_members_keep_the_reversal_order(name, form):
    solver = diffinv.get_solver(name, form=form, x=SYMMETRIC[name])
    nodes = sorted(float(c) for c in solver.tableau.c)
    assert all(abs(a + b - 1) < 1e-12 for a, b in zip(nodes, reversed(nodes))), nodes
    schedule = smooth_schedule() if form == "t" else sd_schedule()
    slope, defects = defect_slope(solver, schedule)
    # at least the declared order (measured: EES(2,5) 6.5 / 6.1, EES(2,7) 8.5 / 8.6 in the lambda-x / t forms)
    assert slope > solver.reversal_order - 0.5, f"{name}/{form}: slope {slope:.2f} (defects {defects})"
