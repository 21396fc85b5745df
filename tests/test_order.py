"""Classical order of every solver in every ODE form, against a DOP853 reference of a nonlinear model.

The model is a 3-component Gaussian mixture (nonlinear eps, so the nonlinear order conditions are
exercised; a single Gaussian's linear field would not). Each solver runs the full range T -> 0 on a
lambda-uniform grid at three step counts where the error is far above round-off and in the
asymptotic regime (checked when the step counts were chosen); the fitted slope of log error against
log steps must be ``-order`` within 0.3.

The lambda and sigma forms run on SD's discrete schedule: their right-hand sides depend on t only
through alpha and sigma, which are smooth functions of lambda. The "t" form's right-hand side has
``d log alpha / dt``, which jumps at every integer timestep of the discrete schedule, so it runs on
the smooth continuous-time schedule.
"""

import functools

import pytest
from helpers import (
    fitted_slope,
    max_abs,
    mixture,
    reference_flow,
    sd_schedule,
    smooth_schedule,
    start_points,
)

import diffinv

TOL = 0.3
FORMS = ("t", "lambda-eps", "lambda-x", "sigma")
# Step counts per solver: ratio 2, well above round-off, in the asymptotic regime for all forms.
STEPS = {
    "euler": (32, 64, 128),
    "ddim": (32, 64, 128),
    "heun": (24, 48, 96),
    "midpoint": (24, 48, 96),
    "ralston": (24, 48, 96),
    "rk4": (10, 20, 40),
    "ees25": (16, 32, 64),
    "ees27": (16, 32, 64),
}


def _schedule(form: str):
    return smooth_schedule() if form == "t" else sd_schedule()


@functools.cache
def _problem(kind: str):
    """(model, start points at T, reference solution at t = 0) on the schedule ``kind``."""
    sched = smooth_schedule() if kind == "smooth" else sd_schedule()
    model = mixture(sched)
    x = start_points(model, 2)
    return model, x, reference_flow(model, sched, x, sched.T, 0.0)


def _slope(solver: str, form: str | None) -> tuple[float, list[float]]:
    sched = _schedule(form or "sigma")
    model, x, ref = _problem("smooth" if form == "t" else "sd")
    opts = {} if form is None else {"form": form}
    steps = STEPS[solver]
    errors = [max_abs(diffinv.generate(model, x, sched, solver=solver, steps=n, **opts), ref) for n in steps]
    assert min(errors) > 1e-9, f"errors {errors} too close to round-off to fit an order"
    return fitted_slope(steps, errors), errors


CASES = [(s, f) for s in ("euler", "heun", "rk4", "ees25", "ees27") for f in FORMS]
CASES += [(s, f) for s in ("midpoint", "ralston") for f in ("t", "lambda-x")]


@pytest.mark.parametrize(("solver", "form"), CASES)
def test_rk_classical_order(solver, form):
    order = diffinv.get_solver(solver, form=form).order
    slope, errors = _slope(solver, form)
    assert abs(slope + order) < TOL, f"{solver}/{form}: slope {slope:.2f}, expected {-order} (errors {errors})"


def test_declared_orders():
    expected = {"euler": 1, "ddim": 1, "heun": 2, "midpoint": 2, "ralston": 2, "rk4": 4, "ees25": 2, "ees27": 2}
    assert {name: diffinv.get_solver(name).order for name in expected} == expected


def test_ddim_first_order():
    slope, errors = _slope("ddim", None)
    assert abs(slope + 1) < TOL, f"ddim: slope {slope:.2f} (errors {errors})"
