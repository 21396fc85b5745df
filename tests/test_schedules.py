"""Noise schedules and grids: inverse maps, SD 1.5 values (solvers.md §1, §2), grid shapes, diffusers parity."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from helpers import sd_schedule, smooth_schedule

import diffinv
from diffinv.schedules import SPACINGS, ContinuousScaledLinear, NoiseSchedule, check_grid, make_grid

F64 = torch.float64
SCHEDULES = {"sd": sd_schedule, "smooth": smooth_schedule}


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_lambda_and_timestep_maps_invert_each_other(kind):
    sched = SCHEDULES[kind]()
    t = torch.cat([torch.linspace(0, sched.T, 20001, dtype=F64), torch.tensor([0.0, 1e-9, 0.5, sched.T - 1e-9])])
    assert (sched.timestep_of_lam(sched.lam(t)) - t).abs().max() < 1e-10
    assert (sched.timestep_of_chi(sched.chi(t)) - t).abs().max() < 1e-10
    lam = torch.linspace(float(sched.lam(sched.T)), float(sched.lam(0)), 20001, dtype=F64)
    assert (sched.lam(sched.timestep_of_lam(lam)) - lam).abs().max() < 1e-10
    chi = torch.exp(-lam)
    assert ((sched.chi(sched.timestep_of_chi(chi)) - chi) / chi).abs().max() < 1e-10


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_schedule_identities(kind):
    sched = SCHEDULES[kind]()
    t = torch.linspace(0, sched.T, 1001, dtype=F64)
    alpha, sigma = sched.alpha(t), sched.sigma(t)
    assert (alpha**2 + sigma**2 - 1).abs().max() < 1e-14
    assert (sched.lam(t) - torch.log(alpha / sigma)).abs().max() < 1e-12
    assert (sched.chi(t) - sigma / alpha).abs().max() < 1e-12
    assert (torch.diff(sched.lam(t)) < 0).all()  # lambda strictly decreasing in t
    # d log alpha / dt is the derivative of log alpha (one-sided inside each unit interval for the discrete schedule)
    mid = torch.arange(0.3, sched.T - 1, 7.0, dtype=F64)
    h = 1e-4
    fd = (sched.log_alpha(mid + h) - sched.log_alpha(mid - h)) / (2 * h)
    assert (fd - sched.d_log_alpha(mid)).abs().max() < 1e-9


def test_sd15_values_solvers_md_section_1():
    sched = sd_schedule()
    n = [0, 1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 700, 900, 999]
    abar = [0.99915, 0.99830, 0.99744, 0.99484, 0.99043, 0.98131, 0.95158, 0.89422, 0.75369, 0.59050, 0.27633]
    abar += [0.08252, 0.01415, 0.00466]
    lam = [3.5347, 3.1865, 2.9822, 2.6309, 2.3198, 1.9806, 1.4891, 1.0673, 0.5592, 0.1830, -0.4814, -1.2043]
    lam += [-2.1219, -2.6820]
    got = sched.alpha(torch.tensor(n, dtype=F64)) ** 2
    assert got.tolist() == pytest.approx(abar, abs=5e-6)
    assert sched.lam(torch.tensor(n, dtype=F64)).tolist() == pytest.approx(lam, abs=5e-5)
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(0.0046601, abs=5e-8)
    assert float(sched.chi(999)) == pytest.approx(14.6146, abs=5e-5)
    assert float(sched.chi(0)) == pytest.approx(0.029167, abs=5e-7)
    assert sched.T == 999.0


# solvers.md §2: the 50-step lambda-uniform grid, computed there by interpolating lambda linearly in t.
REFERENCE_GRID = [999.0, 978.21, 956.78, 934.67, 911.83, 888.22, 863.77, 838.43, 812.15, 784.86, 756.51, 727.05]
REFERENCE_GRID += [696.42, 664.61, 631.61, 597.43, 562.15, 525.87, 488.78, 451.11, 413.16, 375.31, 337.95, 301.54]
REFERENCE_GRID += [266.49, 233.21, 202.05, 173.3, 147.14, 123.69, 102.97, 84.93, 69.42, 56.28, 45.27, 36.15, 28.67]
REFERENCE_GRID += [22.59, 17.69, 13.76, 10.63, 8.14, 6.18, 4.64, 3.42, 2.48, 1.73, 1.12, 0.71, 0.36, 0.0]


def test_lambda_uniform_grid_solvers_md_section_2():
    sched = sd_schedule()
    grid = make_grid(sched, 50, "lambda")
    lam = sched.lam(grid)
    assert (torch.diff(lam) - torch.diff(lam).mean()).abs().max() < 1e-12
    assert float(torch.diff(lam).mean()) == pytest.approx(0.124334, abs=1e-6)
    # Interpolating lambda linearly in t (the reference's way) reproduces the printed grid to its rounding:
    table = sched.lam(torch.arange(1000, dtype=F64)).flip(0)  # increasing in lambda
    ref = []
    for target in lam.tolist():
        j = int(torch.searchsorted(table, torch.tensor(target, dtype=F64)).clamp(1, 999))
        lo, hi = table[j - 1].item(), table[j].item()
        ref.append(999 - j + (hi - target) / (hi - lo))
    assert ref == pytest.approx(REFERENCE_GRID, abs=0.006)
    # We interpolate log alpha linearly (DPM-Solver's discrete schedule). Both interpolants agree at integer
    # timesteps and differ inside a unit interval by the curvature of lambda(t), which is large only near
    # t = 0 (lambda_0 - lambda_1 = 0.348 vs. lambda_1 - lambda_2 = 0.204): a few 1e-3 of a timestep above t = 5,
    # up to ~0.08 in the last steps.
    diff = (grid - torch.tensor(REFERENCE_GRID, dtype=F64)).abs()
    big = torch.tensor(REFERENCE_GRID) > 5
    assert diff[big].max() < 0.015
    assert diff.max() < 0.1


@pytest.mark.parametrize("kind", list(SCHEDULES))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("start", [None, 999.0, 600.5, 37.25, 1.0, 0.01])
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_grids_monotone_and_pinned(kind, spacing, start, steps):
    sched = SCHEDULES[kind]()
    grid = make_grid(sched, steps, spacing, start)
    assert grid.dtype == F64 and grid.shape == (steps + 1,)
    assert grid[0].item() == (sched.T if start is None else start)
    assert grid[-1].item() == 0.0
    assert (torch.diff(grid) < 0).all()
    assert torch.equal(check_grid(sched, grid), grid)
    uniform = {"time": grid, "lambda": sched.lam(grid), "sigma": sched.chi(grid)}[spacing]
    d = torch.diff(uniform)
    assert (d - d.mean()).abs().max() < 1e-9 * max(1.0, d.abs().max().item())


def test_spacings_cluster_as_expected():
    sched = sd_schedule()
    time, lam, chi = (make_grid(sched, 10, s) for s in ("time", "lambda", "sigma"))
    # lambda spacing puts its steps near the clean end, uniform sigma/alpha near the noisy end (chi is large there)
    assert lam[-2] < time[-2] < chi[-2]
    assert lam[1] < time[1] < chi[1]


@pytest.mark.parametrize(
    "config",
    [
        dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(beta_schedule="linear", num_train_timesteps=500),
        dict(trained_betas=torch.linspace(1e-4, 0.03, 300).tolist()),
    ],
)
def test_from_scheduler_and_from_config_reproduce_diffusers(config):
    for cls in (DDIMScheduler, DDPMScheduler):
        scheduler = cls(**config)
        expected = scheduler.alphas_cumprod.to(F64)
        for sched in (NoiseSchedule.from_scheduler(scheduler), NoiseSchedule.from_config(scheduler.config)):
            assert sched.alphas_cumprod.shape == expected.shape
            assert (sched.alphas_cumprod - expected).abs().max() <= 1e-12
            assert len(expected) - 1 == sched.T
            # at integer timesteps alpha and sigma are diffusers' sqrt(alpha_bar), sqrt(1 - alpha_bar)
            ts = torch.arange(len(expected), dtype=F64)
            assert (sched.alpha(ts) - expected.sqrt()).abs().max() < 1e-15
            assert (sched.sigma(ts) - (1 - expected).sqrt()).abs().max() < 1e-14


def test_from_config_accepts_a_plain_dict_and_rejects_unsupported():
    cfg = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    assert (NoiseSchedule.from_config(cfg).alphas_cumprod - sd_schedule().alphas_cumprod).abs().max() < 1e-6
    with pytest.raises(ValueError, match="unsupported beta_schedule 'sigmoid'"):
        NoiseSchedule.from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        NoiseSchedule.from_config({"rescale_betas_zero_snr": True})


def test_bad_schedules_rejected():
    with pytest.raises(ValueError, match="at least 2 entries"):
        NoiseSchedule([0.5])
    with pytest.raises(ValueError, match="strictly inside"):
        NoiseSchedule([1.0, 0.5])
    with pytest.raises(ValueError, match="strictly decreasing"):
        NoiseSchedule([0.9, 0.95])
    with pytest.raises(ValueError, match="beta_start < beta_end"):
        ContinuousScaledLinear(0.012, 0.00085)


def test_continuous_schedule_matches_the_discrete_one():
    smooth, discrete = smooth_schedule(), sd_schedule()
    assert smooth.T == discrete.T
    assert (smooth.alphas_cumprod - discrete.alphas_cumprod).abs().max() < 5e-4  # solvers.md §1: ~4e-4
    t = torch.tensor([0.0, 123.4, 999.0], dtype=F64)
    assert torch.equal(smooth.alphas_cumprod[[0, 999]], torch.exp(2 * smooth.log_alpha(t[[0, 2]])))
    assert math.isclose(float(smooth.d_log_alpha(999.0)), -(0.012 * 1000) / 2 / 1000, rel_tol=1e-12)  # -beta(1)/2N


def test_out_of_range_maps_raise():
    sched = sd_schedule()
    for bad in (-0.5, 999.5, float("nan")):
        with pytest.raises(ValueError, match="timestep outside"):
            sched.alpha(bad)
        with pytest.raises(ValueError, match="timestep outside"):
            smooth_schedule().alpha(bad)
    for bad in (10.0, float("nan")):
        with pytest.raises(ValueError, match="lambda outside"):
            sched.timestep_of_lam(bad)
    with pytest.raises(ValueError, match="lambda outside"):
        smooth_schedule().timestep_of_lam(-10.0)


def test_auto_spacing_is_each_solvers_reference_grid():
    """``spacing="auto"``: DDIM-family and exactly reversible solvers on "time", Runge-Kutta methods on "lambda"."""
    from diffinv.solvers import resolve_spacing

    time_grid = {"ddim", "dpmpp_2m", "edict", "bdia", "belm", "reversible_heun", "mf", "rex"}
    time_grid |= {"rf_solver", "fireflow", "rf_inversion"}  # the flow baselines' official grids are in sigma
    for name in diffinv.list_solvers():
        expected = "time" if name in time_grid else "lambda"
        assert resolve_spacing(name) == expected, name
        assert resolve_spacing(diffinv.get_solver(name), "auto") == expected, name
        for explicit in ("lambda", "time", "sigma"):
            assert resolve_spacing(name, explicit) == explicit
    with pytest.raises(ValueError, match="unknown spacing"):
        resolve_spacing("ees27", "uniform")
