"""Flow-matching (rectified-flow) path: schedule, velocity models, grids and solvers at both singular ends."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from helpers import max_abs, mixture, start_points

import diffinv
from diffinv.analytic import GaussianModel
from diffinv.fields import Field, as_eps_model
from diffinv.schedules import NoiseSchedule, make_grid
from diffinv.solvers import Grid, get_solver


@pytest.fixture(scope="module")
def flow():
    return NoiseSchedule.flow_matching()


def test_flow_schedule_maps(flow):
    t = torch.tensor([0.0, 250.0, 1000.0], dtype=torch.float64)
    assert flow.sigma(t).tolist() == [0.0, 0.25, 1.0]
    assert flow.alpha(t).tolist() == [1.0, 0.75, 0.0]
    lam = flow.lam(t)
    assert lam[0] == float("inf") and lam[2] == float("-inf")
    inner = torch.linspace(1.0, 999.0, 7, dtype=torch.float64)
    assert max_abs(flow.timestep_of_lam(flow.lam(inner)), inner) < 1e-9
    assert max_abs(flow.timestep_of_chi(flow.chi(inner)), inner) < 1e-9
    assert flow.timestep_of_lam(torch.tensor([float("inf"), float("-inf")])).tolist() == [0.0, 1000.0]
    assert flow.timestep_of_chi(torch.tensor([float("inf")])).tolist() == [1000.0]
    assert flow.alphas_cumprod is None and flow.is_flow and not NoiseSchedule.scaled_linear().is_flow


def test_from_scheduler_accepts_flow_match():
    sched = NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    assert sched.is_flow and sched.T == 1000.0


def test_flow_velocity_to_eps(flow):
    model = mixture(flow)
    x = start_points(model, 3)
    for t in (1000.0, 600.0, 0.0):
        eps = as_eps_model(model.velocity, flow, "flow")(x, torch.tensor(t, dtype=torch.float64))
        sigma = t / 1000
        if 0 < sigma < 1:
            assert max_abs(eps, model.eps(x, t)) < 1e-12
        # the definition: v = eps - x0 with x = (1 - sigma) x0 + sigma eps
        x0 = x - sigma * model.velocity(x, t)
        assert max_abs((1 - sigma) * x0 + sigma * eps, x) < 1e-12
    assert (
        max_abs(Field(as_eps_model(model.velocity, flow, "flow"), flow).x0(x, 1000.0), x - model.velocity(x, 1000.0))
        < 1e-14
    )


def test_flow_model_needs_flow_schedule():
    with pytest.raises(ValueError, match="flow-matching schedule"):
        as_eps_model(lambda x, t: x, NoiseSchedule.scaled_linear(), "flow")


def test_lambda_spacing_refused_at_infinite_ends(flow):
    with pytest.raises(ValueError, match="finite half-log-SNR"):
        make_grid(flow, 10, "lambda")
    with pytest.raises(ValueError, match="finite sigma/alpha"):
        make_grid(flow, 10, "sigma")
    grid = make_grid(flow, 10, "lambda", start=990.0, end=10.0)
    assert grid[0] == 990.0 and grid[-1] == 10.0


@pytest.mark.parametrize("kwargs", [{"shift": 1.0}, {"shift": 3.0}, {"use_dynamic_shifting": True}])
def test_scheduler_spacing_and_euler_equals_diffusers_step(flow, kwargs):
    """DDIM on the scheduler's own grid is exactly FlowMatchEulerDiscreteScheduler.step (float64)."""
    model = mixture(flow)
    x = start_points(model, 4, seed=3)
    extra = {"mu": 0.8} if kwargs.get("use_dynamic_shifting") else {}
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **kwargs)
    timesteps = make_grid(flow, 12, "scheduler", scheduler=sched, **extra)
    assert timesteps[0] == 1000.0 and timesteps[-1] == 0.0 and len(timesteps) == 13
    ours = diffinv.generate(as_eps_model(model.velocity, flow, "flow"), x, flow, solver="ddim", timesteps=timesteps)
    sched.set_timesteps(12, **extra)
    sigmas = sched.sigmas.double()
    # Transcription of FlowMatchEulerDiscreteScheduler.step: prev = sample + (sigma_next - sigma) * model_output.
    ref = x.clone()
    for i in range(len(sched.timesteps)):
        ref = ref + (sigmas[i + 1] - sigmas[i]) * model.velocity(ref, sigmas[i] * 1000)
    assert torch.isfinite(ours).all()
    assert max_abs(ours, ref) < 1e-10
    # diffusers' own step loop (it upcasts the sample to float32 inside step, hence the looser tolerance)
    out = x.clone()
    for tau in sched.timesteps:
        out = sched.step(model.velocity(out, tau.double()), tau, out).prev_sample
    assert max_abs(ours, out) < 1e-6


def test_euler_rk_equals_ddim_on_flow(flow):
    """Flow Euler: the 't'-form Euler step equals DDIM on the flow path."""
    model = mixture(flow)
    x = start_points(model, 2)
    ts = make_grid(flow, 9, "time")
    eps = as_eps_model(model.velocity, flow, "flow")
    a = diffinv.generate(eps, x, flow, solver="ddim", timesteps=ts)
    b = diffinv.generate(eps, x, flow, solver=get_solver("euler", form="t"), timesteps=ts)
    assert max_abs(a, b) < 1e-12


def test_gaussian_exact_flow(flow):
    g = GaussianModel(flow, torch.tensor([0.5, -1.0]), torch.tensor([0.3, 2.0]))
    x = start_points(g, 3)
    grid = Grid(flow, make_grid(flow, 400, "time"))
    field = Field(as_eps_model(g.velocity, flow, "flow"), flow)
    solver = get_solver("rk4", form="t")
    state = solver.init_state(x, grid)
    for k in range(grid.steps):
        state = solver.step(field, grid, k, state)
    assert max_abs(state.x, g.flow(x, 1000.0, 0.0)) < 1e-9
