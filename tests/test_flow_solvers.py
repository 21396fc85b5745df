"""Every solver on the rectified-flow path with an exact velocity model: both singular ends, classical and
reversal orders, exact round trips, diffusers' flow-Euler step, and the flow baselines against transcriptions
of their official updates (RF-Solver, FireFlow, RF-Inversion)."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from helpers import fitted_slope, max_abs, mixture, start_points
from test_reversibility import defect_slope

import diffinv
from diffinv.analytic import GaussianModel
from diffinv.fields import as_eps_model
from diffinv.schedules import NoiseSchedule, make_grid
from diffinv.solvers import FLOW_ONLY, Grid, get_solver, list_solvers
from diffinv.solvers.rk import interval_forms

FLOW = NoiseSchedule.flow_matching()
FORMS = ("t", "lambda-eps", "lambda-x", "sigma")


@functools.cache
def _mix():
    return mixture(FLOW)


def _eps(model=None):
    return as_eps_model((model or _mix()).velocity, FLOW, "flow")


@functools.cache
def _reference(steps: int = 2000):
    """The flow map T -> 0 of the mixture by RK4 in the t form (smooth velocity; converged to ~1e-13)."""
    x = start_points(_mix(), 2)
    return x, diffinv.generate(
        _eps(), x, FLOW, solver=get_solver("rk4", form="t"), timesteps=make_grid(FLOW, steps, "time")
    )


# -- both singular ends ------------------------------------------------------------------------------------------


def test_end_intervals_of_singular_forms_are_taken_in_the_t_form():
    grid = Grid(FLOW, make_grid(FLOW, 6, "time"))
    names = {f: [g.name for g in interval_forms(diffinv.fields.get_form(f), grid)] for f in FORMS}
    assert names["t"] == ["t"] * 6
    assert names["sigma"] == ["t"] + ["sigma"] * 5  # chi = inf and x/alpha at sigma = 1 only
    assert names["lambda-x"] == ["t"] + ["lambda-x"] * 4 + ["t"]  # lambda = -inf / +inf, x/sigma at sigma = 0
    assert names["lambda-eps"] == ["t"] + ["lambda-eps"] * 4 + ["t"]
    vp = Grid(diffinv.NoiseSchedule.scaled_linear(), make_grid(diffinv.NoiseSchedule.scaled_linear(), 6, "time"))
    assert [g.name for g in interval_forms(diffinv.fields.get_form("lambda-x"), vp)] == ["lambda-x"] * 6


@pytest.mark.parametrize("form", ("lambda-x", "lambda-eps"))
def test_lambda_forms_compose_t_ends_and_lambda_interior(form):
    """What the lambda forms do on a full flow grid: the first and last interval in 't', the rest in the form."""
    x = start_points(_mix(), 3)
    ts = make_grid(FLOW, 8, "time")
    whole = diffinv.generate(_eps(), x, FLOW, solver=get_solver("ees27", form=form), timesteps=ts)
    part = diffinv.generate(_eps(), x, FLOW, solver=get_solver("ees27", form="t"), timesteps=ts[:2])
    part = diffinv.generate(_eps(), part, FLOW, solver=get_solver("ees27", form=form), timesteps=ts[1:-1])
    part = diffinv.generate(_eps(), part, FLOW, solver=get_solver("ees27", form="t"), timesteps=ts[-2:])
    assert torch.isfinite(whole).all() and max_abs(whole, part) < 1e-12


def _cases():
    rk = ("euler", "heun", "midpoint", "ralston", "rk4", "ees25", "ees27", "reversible_heun", "mf")
    cases = [(n, f) for n in rk for f in FORMS]
    return cases + [(n, None) for n in list_solvers() if n not in rk]


@pytest.mark.parametrize(("name", "form"), _cases())
def test_every_solver_runs_the_full_flow_grid_to_the_clean_end(name, form):
    """From x0 at sigma = 0 to sigma = 1 and back, on the scheduler's own grid (shift 3, both ends included)."""
    solver = get_solver(name, **({} if form is None else {"form": form}))
    x0 = _mix().sample(3, generator=torch.Generator().manual_seed(2))
    ts = make_grid(FLOW, 10, "scheduler", scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert ts[0] == 1000.0 and ts[-1] == 0.0
    if name in ("edict", "belm"):
        with pytest.raises(ValueError, match=f"{name} is not invertible where alpha = 0"):
            diffinv.invert(_eps(), x0, FLOW, solver=solver, timesteps=ts)
        ts = ts[1:]
    inv = diffinv.invert(_eps(), x0, FLOW, solver=solver, timesteps=ts)
    out = diffinv.generate(_eps(), inv)
    assert torch.isfinite(inv.latent).all() and torch.isfinite(out).all()
    if solver.exact:
        assert max_abs(out, x0) <= 1e-10, name


@pytest.mark.parametrize("name", ["ddim", "bdia", "dpmpp_2m", "fireflow", "rf_solver"])
def test_plain_generation_from_pure_noise(name):
    x = start_points(_mix(), 2)
    out = diffinv.generate(_eps(), x, FLOW, solver=name, timesteps=make_grid(FLOW, 200, "time"))
    _, ref = _reference()
    assert max_abs(out, ref[: len(out)] if out.shape == ref.shape else ref) < 0.05


@pytest.mark.parametrize("kwargs", [{"shift": 1.0}, {"shift": 3.0}])
@pytest.mark.parametrize("name", ["euler", "ddim"])
def test_euler_and_ddim_with_explicit_timesteps_equal_the_scheduler_step_loop(name, kwargs):
    """Our float64 Euler ('t' form and the default 'lambda-x' form, whose end intervals are 't') and DDIM on the
    scheduler's timesteps equal FlowMatchEulerDiscreteScheduler.step (float32 inside it: 1e-6) and its update
    transcribed in float64 (1e-10)."""
    x = start_points(_mix(), 3, seed=5)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **kwargs)
    ts = make_grid(FLOW, 9, "scheduler", scheduler=sched)
    forms = ("t", "sigma") if name == "euler" else (None,)
    sched.set_timesteps(9)
    assert ts.shape == sched.sigmas.shape and max_abs(ts / 1000, sched.sigmas.double()) < 1e-6  # its grid, in f32
    sched.sigmas = ts / 1000  # the same float64 grid on both sides: what is compared is the step
    ref, ours = x.clone(), x.clone()
    for i, tau in enumerate(sched.timesteps):
        v = _mix().velocity(ours, ts[i])
        ref = sched.step(_mix().velocity(ref, ts[i]), tau, ref).prev_sample  # upcasts its sample to float32
        ours = ours + (ts[i + 1] - ts[i]) / 1000 * v  # its step, transcribed (prev = x + (sigma_next - sigma) v)
    assert max_abs(ours, ref) < 1e-6
    ref = ours
    for form in forms:
        solver = get_solver(name, **({} if form is None else {"form": form}))
        out = diffinv.generate(_eps(), x, FLOW, solver=solver, timesteps=ts)
        assert max_abs(out, ref) < 1e-10, (form, max_abs(out, ref))


# -- orders on the flow path -------------------------------------------------------------------------------------

STEPS = {"euler": (32, 64, 128), "ddim": (32, 64, 128), "heun": (24, 48, 96), "rk4": (16, 32, 64)}
STEPS |= {"ees25": (16, 32, 64), "ees27": (16, 32, 64), "rf_solver": (24, 48, 96), "fireflow": (24, 48, 96)}


@pytest.mark.parametrize(
    ("name", "form"),
    [(n, f) for n in ("euler", "heun", "rk4", "ees25", "ees27") for f in ("t", "sigma") if (n, f) != ("rk4", "sigma")]
    + [("ddim", None), ("rf_solver", None), ("fireflow", None)],
)
def test_classical_order_on_the_flow_path(name, form):
    """On the sigma-uniform grid (SD3's unshifted one). Not RK4 in the sigma form: its sigma/alpha steps next to the
    noise end grow with the step count there (measured slope -2.3 over 32..128 steps), capping the order."""
    solver = get_solver(name, **({} if form is None else {"form": form}))
    x, ref = _reference()
    steps = STEPS[name]
    errors = [
        max_abs(diffinv.generate(_eps(), x, FLOW, solver=solver, timesteps=make_grid(FLOW, n, "time")), ref)
        for n in steps
    ]
    assert min(errors) > 1e-9, errors
    slope = fitted_slope(steps, errors)
    assert abs(slope + solver.order) < 0.3, f"{name}/{form}: slope {slope:.2f} (errors {errors})"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ["ees25", "ees27"])
def test_ees_reversal_orders_on_the_flow_path(name, form):
    """The one-step defect on the flow path (lambda = -1: sigma = 0.73, inside the path) is O(h^6) / O(h^8)."""
    solver = get_solver(name, form=form)
    slope, defects = defect_slope(solver, FLOW, hs=(0.8, 0.4, 0.2) if (name, form) == ("ees27", "t") else None)
    assert slope > solver.reversal_order - 0.5, f"{name}/{form}: slope {slope:.2f} (defects {defects})"


@pytest.mark.parametrize("name", ["mf", "rex", "reversible_heun", "edict", "bdia", "belm"])
def test_exact_solvers_round_trip_on_gaussian_flow_data(name):
    g = GaussianModel(FLOW, torch.tensor([0.5, -1.0]), torch.tensor([0.3, 2.0]))
    x0 = g.sample(4, generator=torch.Generator().manual_seed(1))
    ts = make_grid(FLOW, 12, "time", start=990.0 if name in ("edict", "belm") else None)
    inv = diffinv.invert(_eps(g), x0, FLOW, solver=name, timesteps=ts)
    assert max_abs(diffinv.generate(_eps(g), inv), x0) <= 1e-10


# -- the flow baselines against their official updates --------------------------------------------------------------


def _velocity(x, sigma):
    """The official codes' model call: the transformer's velocity at sigma (FLUX's timestep in [0, 1])."""
    return _mix().velocity(x, torch.tensor(1000.0 * sigma, dtype=torch.float64))


def _sigmas(n):
    return [
        float(s) for s in make_grid(FLOW, n, "scheduler", scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)) / 1000
    ]


def _run(name, x, sigmas, inverse, **options):
    ts = torch.tensor(sigmas, dtype=torch.float64) * 1000
    if inverse:
        return diffinv.invert(_eps(), x, FLOW, solver=name, timesteps=ts, **options)
    return diffinv.generate(_eps(), x, FLOW, solver=name, timesteps=ts, **options)


@pytest.mark.parametrize("inverse", [False, True])
def test_rf_solver_equals_the_official_taylor_step(inverse):
    # Transcription of RF-Solver-Edit FLUX_Image_Edit/src/flux/sampling.py ``denoise`` (inverse: timesteps reversed).
    sigmas = _sigmas(7)
    x = start_points(_mix(), 3)
    ts = sigmas[::-1] if inverse else sigmas
    img = x.clone()
    for t_curr, t_prev in itertools.pairwise(ts):
        pred = _velocity(img, t_curr)
        img_mid = img + (t_prev - t_curr) / 2 * pred
        pred_mid = _velocity(img_mid, t_curr + (t_prev - t_curr) / 2)
        first_order = (pred_mid - pred) / ((t_prev - t_curr) / 2)
        img = img + (t_prev - t_curr) * pred + 0.5 * (t_prev - t_curr) ** 2 * first_order
    ours = _run("rf_solver", x, sigmas, inverse)
    assert max_abs(ours.latent if inverse else ours, img) < 1e-12


@pytest.mark.parametrize("inverse", [False, True])
def test_fireflow_equals_the_official_update(inverse):
    # Transcription of FireFlow src/flux/sampling.py ``denoise_fireflow``.
    sigmas = _sigmas(7)
    x = start_points(_mix(), 3)
    ts = sigmas[::-1] if inverse else sigmas
    img, next_step_velocity, calls = x.clone(), None, 0
    for t_curr, t_prev in itertools.pairwise(ts):
        if next_step_velocity is None:
            pred, calls = _velocity(img, t_curr), calls + 1
        else:
            pred = next_step_velocity
        img_mid = img + (t_prev - t_curr) / 2 * pred
        pred_mid, calls = _velocity(img_mid, t_curr + (t_prev - t_curr) / 2), calls + 1
        next_step_velocity = pred_mid
        img = img + (t_prev - t_curr) * pred_mid
    ours = _run("fireflow", x, sigmas, inverse)
    assert max_abs(ours.latent if inverse else ours, img) < 1e-12
    if inverse:
        assert ours.nfe == calls == len(sigmas)  # one call per step after the first


def test_rf_inversion_equals_the_official_controlled_odes():
    # Transcription of diffusers' community pipeline_flux_rf_inversion ``invert`` (Algorithm 1) and ``__call__``
    # (Algorithm 2, ODE branch), at the grid's own sigmas (see RFInversion's docstring).
    n, gamma, eta, start, stop = 8, 0.5, 0.9, 0.0, 0.25
    sigmas = _sigmas(n)
    x0 = _mix().sample(3, generator=torch.Generator().manual_seed(4))
    y_1 = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Y_t = x0.clone()
    up = sigmas[::-1]
    for i in range(n):
        t_i = up[i]
        u_t_i = _velocity(Y_t, t_i)
        u_t_i_cond = (y_1 - Y_t) / (1 - t_i)
        u_hat_t_i = u_t_i + gamma * (u_t_i_cond - u_t_i)
        Y_t = Y_t + u_hat_t_i * (up[i + 1] - up[i])
    inv = _run("rf_inversion", x0, sigmas, True)
    assert max_abs(inv.latent, Y_t) < 1e-12
    y_0, latents = x0, Y_t.clone()
    start_step, stop_step = int(start * n), min(int(stop * n), n)
    for i in range(n):
        t_i = 1 - sigmas[i]
        v_t = -_velocity(latents, sigmas[i])
        v_t_cond = (y_0 - latents) / (1 - t_i)
        v_hat_t = v_t + eta * (v_t_cond - v_t) if start_step <= i < stop_step else v_t
        latents = latents + v_hat_t * (sigmas[i] - sigmas[i + 1])
    assert max_abs(diffinv.generate(_eps(), inv), latents) < 1e-12
    # eta = 1 over every step pulls the edit onto the source latent at the last step (the controller's limit)
    inv = _run("rf_inversion", x0, sigmas, True, eta=1.0, stop_timestep=1.0)
    assert max_abs(diffinv.generate(_eps(), inv), x0) < 1e-12


@pytest.mark.parametrize("name", FLOW_ONLY)
def test_flow_baselines_refuse_a_vp_schedule(name):
    vp = diffinv.NoiseSchedule.scaled_linear()
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match=f"^{name} is a rectified-flow solver: it needs a flow-matching schedule"):
        diffinv.invert(lambda x, t: x, x, vp, solver=name, steps=4, spacing="time")
    assert name not in list_solvers(vp) and name in list_solvers(FLOW) and name in list_solvers()


def test_rf_inversion_options_are_checked():
    for bad in (
        {"gamma": 1.5},
        {"eta": -0.1},
        {"stop_timestep": 2.0},
        {"seed": -1},
        {"start_timestep": 0.5, "stop_timestep": 0.2},
    ):
        with pytest.raises(ValueError):
            get_solver("rf_inversion", **bad)
    assert get_solver("rf_inversion").options() == {
        "gamma": 0.5,
        "eta": 0.9,
        "start_timestep": 0.0,
        "stop_timestep": 0.25,
        "seed": 0,
    }
