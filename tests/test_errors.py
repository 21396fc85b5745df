"""Bad input gives a ValueError that names the problem; invert/generate keep the caller's dtype and device."""

import pytest
import torch

import diffinv
from diffinv.analytic import GaussianModel
from diffinv.fields import get_form

SCHED = diffinv.NoiseSchedule.scaled_linear()
MODEL = GaussianModel(SCHED, torch.full((2, 3), 0.2), 0.3)
X0 = MODEL.sample(2, generator=torch.Generator().manual_seed(0))


def _invert(**kwargs):
    args = {"model": MODEL, "x0": X0, "schedule": SCHED, "steps": 3} | kwargs
    return diffinv.invert(**args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"solver": "rk5"}, r"unknown solver 'rk5'; choose one of ddim, euler"),
        ({"solver": "ees27", "form": "bogus"}, r"unknown ODE form 'bogus'; choose one of t, lambda-eps"),
        ({"solver": "ees27", "eta": 0.5}, r"solver 'ees27' has no option 'eta' \(accepted: form, x\)"),
        ({"solver": "ddim", "form": "sigma"}, r"solver 'ddim' has no option 'form' \(accepted: inversion_timestep\)"),
        ({"solver": "ddim", "inversion_timestep": "later"}, r"inversion_timestep must be one of current, target"),
        ({"solver": "ees25", "x": 0.5}, r"EES\(2,5;x\) is undefined at x = 0.5"),
        ({"steps": 0}, r"steps must be a positive integer, got 0"),
        ({"steps": -1}, r"steps must be a positive integer, got -1"),
        ({"steps": 2.5}, r"steps must be a positive integer, got 2.5"),
        ({"steps": True}, r"steps must be a positive integer, got True"),
        ({"steps": "10"}, r"steps must be a positive integer, got '10'"),
        ({"spacing": "log"}, r"unknown spacing 'log'; choose one of lambda, time, sigma"),
        ({"start": 1500}, r"start must satisfy 0 < start <= 999, got 1500"),
        ({"start": 0}, r"start must satisfy 0 < start <= 999, got 0"),
        ({"start": -3.0}, r"start must satisfy 0 < start <= 999, got -3.0"),
        ({"start": float("nan")}, r"start must satisfy 0 < start <= 999, got nan"),
        ({"steps": None, "timesteps": [500, 600, 0]}, r"timesteps must be strictly decreasing"),
        ({"steps": None, "timesteps": [500, 500, 0]}, r"timesteps must be strictly decreasing"),
        ({"steps": None, "timesteps": [1200, 500, 0]}, r"timesteps must lie in \[0, 999\], got 1200..0"),
        ({"steps": None, "timesteps": [500, -2]}, r"timesteps must lie in \[0, 999\], got 500..-2"),
        ({"steps": None, "timesteps": [500]}, r"timesteps needs at least 2 entries \(start and end\), got 1"),
        ({"steps": None, "timesteps": []}, r"timesteps needs at least 2 entries"),
        ({"steps": None, "timesteps": [500, float("nan"), 0]}, r"timesteps contain NaN or inf"),
        ({"steps": None, "timesteps": ["a", 0]}, r"timesteps must be a sequence of numbers"),
        ({"timesteps": [500, 0]}, r"give either timesteps= or steps=/start=, not both"),
        ({"steps": None, "start": 500, "timesteps": [500, 0]}, r"give either timesteps= or steps=/start=, not both"),
        ({"x0": X0.clone().fill_(float("nan"))}, r"x0 contains NaN or inf"),
        ({"x0": X0.clone().index_fill_(1, torch.tensor([1]), float("inf"))}, r"x0 contains NaN or inf"),
        ({"x0": X0.tolist()}, r"x0 must be a torch.Tensor, got list"),
        ({"x0": X0.long()}, r"x0 must be a floating-point tensor, got torch.int64"),
        ({"x0": X0[:0]}, r"x0 is empty"),
        ({"model": lambda x, t: x[:, :1]}, r"model returned shape \(2, 1, 3\) for input of shape \(2, 2, 3\)"),
        ({"model": "unet"}, r"model must be callable as eps\(x, t\), got str"),
        ({"schedule": SCHED.alphas_cumprod}, r"schedule must be a NoiseSchedule, got Tensor"),
    ],
)
def test_invert_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _invert(**kwargs)


def test_generate_rejects_bad_input():
    noise = torch.randn(2, 2, 3)
    with pytest.raises(ValueError, match="generate from a plain tensor needs a schedule"):
        diffinv.generate(MODEL, noise)
    with pytest.raises(ValueError, match="unknown solver 'nope'"):
        diffinv.generate(MODEL, noise, SCHED, solver="nope")
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        diffinv.generate(MODEL, noise, SCHED, steps=0)
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        diffinv.generate(MODEL, torch.full((2, 2, 3), float("nan")), SCHED)
    with pytest.raises(ValueError, match="model returned shape"):
        diffinv.generate(lambda x, t: x.sum(0), noise, SCHED, steps=2)


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({"schedule": SCHED}, "schedule"),
        ({"solver": "ddim"}, "solver"),
        ({"steps": 10}, "steps"),
        ({"spacing": "time"}, "spacing"),
        ({"timesteps": [999, 0]}, "timesteps"),
        ({"start": 500}, "start"),
        ({"form": "t"}, "form"),
        ({"solver": "ees25", "steps": 5, "x": 0.2}, "solver, steps, x"),
    ],
)
def test_generate_from_inversion_rejects_grid_and_solver_arguments(extra, names):
    inv = _invert()
    with pytest.raises(ValueError, match=f"uses its own grid and solver; drop {names}$"):
        diffinv.generate(MODEL, inv, **extra)


def test_ees_parameter_x_passes_through_generate():
    noise = torch.randn(2, 2, 3, dtype=torch.float64)
    a = diffinv.generate(MODEL, noise, SCHED, solver="ees25", steps=3, x=0.2)
    b = diffinv.generate(MODEL, noise, SCHED, solver=diffinv.get_solver("ees25", x=0.2), steps=3)
    assert torch.equal(a, b)


def test_get_solver_errors():
    with pytest.raises(ValueError, match="unknown solver 'ees'; choose one of"):
        diffinv.get_solver("ees")
    with pytest.raises(ValueError, match=r"has no option 'forms'"):
        diffinv.get_solver("heun", forms="t")
    with pytest.raises(ValueError, match=r"options .* given with an already built solver"):
        diffinv.get_solver(diffinv.get_solver("heun"), form="t")
    with pytest.raises(ValueError, match="unknown ODE form 'x'"):
        get_form("x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", ["ees27", "ddim", "heun"])
def test_dtype_and_device_are_kept(dtype, solver):
    x0 = X0.to(dtype)
    inv = diffinv.invert(MODEL, x0, SCHED, solver=solver, steps=4)
    assert inv.latent.dtype == dtype and inv.latent.device == x0.device
    assert inv.state.x.dtype == dtype  # the solver state works in the caller's float precision
    out = diffinv.generate(MODEL, inv)
    assert out.dtype == dtype and out.device == x0.device and out.shape == x0.shape
    plain = diffinv.generate(MODEL, inv.latent, SCHED, solver=solver, steps=4)
    assert plain.dtype == dtype and plain.device == x0.device
    if dtype == torch.float32:  # computed in float32, not in a lower precision
        ref = diffinv.generate(MODEL, inv.latent.double(), SCHED, solver=solver, steps=4)
        assert (plain.double() - ref).abs().max() < 1e-5


def test_half_precision_input_keeps_its_dtype_with_float32_state():
    x0 = X0.to(torch.bfloat16)
    inv = diffinv.invert(MODEL, x0, SCHED, steps=3)
    assert inv.state.x.dtype == torch.float32 and inv.latent.dtype == torch.bfloat16
    assert diffinv.generate(MODEL, inv).dtype == torch.bfloat16


def test_divergence_is_reported():
    def exploding(x, t):
        return x * 1e6

    with pytest.raises(diffinv.SolverDivergence, match="solver ees27 diverged at step 1"):
        diffinv.invert(exploding, X0, SCHED, steps=3)
    with pytest.raises(diffinv.SolverDivergence, match="non-finite values"):
        diffinv.invert(lambda x, t: x * float("nan"), X0, SCHED, steps=3)
