"""Exactly reversible baselines (EDICT, BDIA, O-BELM, reversible Heun, McCallum-Foster, Rex) and DPM-Solver++(2M).

Exactness: invert -> generate with the same model is the identity to round-off (float64), on the
analytic mixture and on a tiny random UNet. Faithfulness: one step equals the reference update written
out here from ``alphas_cumprod`` (reference/solvers.md §4-§8). Order: slopes on the analytic mixture.
"""

from __future__ import annotations

import math

import pytest
import torch

import diffinv
from diffinv.analytic import GaussianMixture
from diffinv.fields import Field
from diffinv.solvers import Grid, get_solver, list_solvers, solver_options
from diffinv.solvers.coupled import EDICTState, TwoStepState
from diffinv.solvers.reversible import CoupledState

SCHED = diffinv.NoiseSchedule.scaled_linear()
NEW = ["edict", "bdia", "belm", "reversible_heun", "mf", "rex", "dpmpp_2m"]
EXACT = [
    ("edict", {}),
    ("edict", {"leapfrog": False}),
    ("bdia", {}),
    ("belm", {}),
    ("reversible_heun", {}),
    ("mf", {"base": "euler"}),
    ("mf", {"base": "ees25"}),
    ("rex", {"mode": "noise"}),
    ("rex", {"mode": "data"}),
]
GRIDS = [(10, "lambda", None), (50, "time", None), (10, "time", 600.0), (50, "lambda", 400.0)]


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    return GaussianMixture(SCHED, means, torch.tensor([0.05, 0.1, 0.2]))


def _roundtrip(model, x0: torch.Tensor, name: str, opts: dict, steps: int, spacing: str, start) -> float:
    inv = diffinv.invert(model, x0, SCHED, solver=name, steps=steps, spacing=spacing, start=start, **opts)
    assert inv.solver.exact
    out = diffinv.generate(model, inv)
    assert out.dtype == x0.dtype and out.shape == x0.shape
    return (out - x0).abs().max().item()


# -- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,spacing,start", GRIDS)
@pytest.mark.parametrize("name,opts", EXACT, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_exact_roundtrip_analytic(mixture, name, opts, steps, spacing, start):
    x0 = mixture.sample(2, generator=torch.Generator().manual_seed(1))
    assert _roundtrip(mixture, x0, name, opts, steps, spacing, start) <= 1e-10


def test_non_exact_solvers_do_not_roundtrip(mixture):
    """The same check fails for the non-reversible methods, so it can fail."""
    x0 = mixture.sample(2, generator=torch.Generator().manual_seed(1))
    for name in ("ddim", "dpmpp_2m"):
        inv = diffinv.invert(mixture, x0, SCHED, solver=name, steps=10)
        assert not inv.solver.exact
        assert (diffinv.generate(mixture, inv) - x0).abs().max() > 1e-4


@pytest.fixture(scope="module")
def unet_eps():
    from tiny import float64_copy, tiny_unet, tiny_unet_eps

    unet = float64_copy(tiny_unet()).requires_grad_(False)
    context = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return tiny_unet_eps(unet, context)


# The random UNet is slow on CPU: every exact method at 10 steps (grids alternating), and BDIA,
# whose inversion divides by gamma at every step, at 50 steps.
UNET_CASES = [(name, opts, *GRIDS[2 * (i % 2)]) for i, (name, opts) in enumerate(EXACT)] + [("bdia", {}, *GRIDS[1])]


@pytest.mark.parametrize("name,opts,steps,spacing,start", UNET_CASES)
def test_exact_roundtrip_tiny_unet(unet_eps, name, opts, steps, spacing, start):
    x0 = 0.8 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert _roundtrip(unet_eps, x0, name, opts, steps, spacing, start) <= 1e-10


# -- bookkeeping ---------------------------------------------------------------------------------


def test_registry_and_attributes():
    for name in NEW:
        assert name in list_solvers()
        s = get_solver(name)
        assert s.name == name and set(s.options()) <= set(solver_options(name))
        assert s.exact == (name != "dpmpp_2m")
    assert get_solver("mf", base="ees25").nfe_per_step == 6
    assert get_solver("rex", base="rk4").nfe_per_step == 8
    assert (get_solver("edict").nfe_per_step, get_solver("bdia").nfe_per_step) == (2, 1)
    assert get_solver("belm").order == get_solver("dpmpp_2m").order == get_solver("reversible_heun").order == 2
    assert get_solver("mf", base="ees25").options() == {"base": "ees25", "coupling": 0.999, "form": "lambda-x"}
    assert get_solver("rex").options() == {"base": "euler", "mode": "noise", "coupling": 0.999}


def test_nfe_and_state_bookkeeping(mixture):
    x0 = mixture.sample(1, generator=torch.Generator().manual_seed(4))
    steps = 6
    for name, opts in [*EXACT, ("dpmpp_2m", {})]:
        inv = diffinv.invert(mixture, x0, SCHED, solver=name, steps=steps, **opts)
        extra = 1 if name == "reversible_heun" else 0  # the slope at the clean end
        assert inv.nfe == steps * inv.solver.nfe_per_step + extra, name
        moved = inv.to("cpu")
        assert type(moved.state) is type(inv.state)
        assert torch.equal(moved.latent, inv.latent)
    # BDIA/BELM: the inversion ends with the pair (x_0, x_1); generation takes x_1 without a model call.
    inv = diffinv.invert(mixture, x0, SCHED, solver="bdia", steps=steps)
    assert inv.state.cleaner is not None and inv.state.noisier is None
    field = Field(mixture, SCHED)
    first = inv.solver.step(field, inv.grid, 0, inv.solver.to_generation(inv.state, inv.grid))
    assert field.nfe == 0 and torch.equal(first.x, inv.state.cleaner) and torch.equal(first.noisier, inv.state.x)
    # DPM-Solver++(2M): generation starts without the inversion's history.
    inv = diffinv.invert(mixture, x0, SCHED, solver="dpmpp_2m", steps=steps)
    assert inv.state.d_prev is not None
    assert inv.solver.to_generation(inv.state, inv.grid).d_prev is None


def test_plain_tensor_init_states():
    grid = Grid(SCHED, [999.0, 500.0, 0.0])
    x = torch.randn(1, 3, dtype=torch.float64)
    assert torch.equal(get_solver("edict").init_state(x, grid).y, x)
    assert torch.equal(get_solver("mf").init_state(x, grid).z, x)
    assert torch.equal(get_solver("rex").init_inversion(x, grid).z, x)
    rh = get_solver("reversible_heun").init_state(x, grid)
    assert torch.equal(rh.z, x) and rh.f is None
    pair = get_solver("bdia").init_state(x, grid)
    assert pair.noisier is None and pair.cleaner is None


# -- faithfulness: one step against the reference formulas --------------------------------------

TS = [999.0, 900.0, 760.0, 600.0, 430.0, 260.0, 110.0, 0.0]  # integer timesteps: alphas straight from the table
ALPHA_BAR = [SCHED.alphas_cumprod[int(t)].item() for t in TS]
A = [math.sqrt(ab) for ab in ALPHA_BAR]
S = [math.sqrt(1 - ab) for ab in ALPHA_BAR]


def toy_eps(x: torch.Tensor, t) -> torch.Tensor:
    """A cheap smooth nonlinear noise model."""
    return 0.7 * torch.sin(1.3 * x + float(t) / 400.0) + 0.05 * x


def _x0(x, i):
    return (x - S[i] * toy_eps(x, TS[i])) / A[i]


def _rand(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= 1e-12


@pytest.fixture
def setup():
    return Field(toy_eps, SCHED), Grid(SCHED, TS)


def _edict_reference(x, y, k, p, leapfrog, reverse):
    """salesforce/EDICT ``coupled_stablediffusion``: forward_step / reverse_step and the mixing layer."""
    ab_t, ab_prev = ALPHA_BAR[k], ALPHA_BAR[k + 1]
    aq = (ab_t / ab_prev) ** 0.5

    def forward_step(e, sample):
        return (1.0 / aq) * sample - (1.0 / aq) * (1 - ab_t) ** 0.5 * e + (1 - ab_prev) ** 0.5 * e

    def reverse_step(e, sample):
        return aq * sample + (1 - ab_t) ** 0.5 * e - aq * (1 - ab_prev) ** 0.5 * e

    pair = [x.clone(), y.clone()]
    if reverse:
        pair[1] = (pair[1] - (1 - p) * pair[0]) / p
        pair[0] = (pair[0] - (1 - p) * pair[1]) / p
    for latent_i in range(2):
        if reverse:
            li = (latent_i + (k + 1) % 2) % 2 if leapfrog else (latent_i + 1) % 2
        else:
            li = (latent_i + k % 2) % 2 if leapfrog else latent_i
        e = toy_eps(pair[(li + 1) % 2], TS[k])
        pair[li] = (reverse_step if reverse else forward_step)(e, pair[li])
    if not reverse:
        pair[0] = p * pair[0] + (1 - p) * pair[1]
        pair[1] = (1 - p) * pair[0] + p * pair[1]
    return pair


@pytest.mark.parametrize("leapfrog", [True, False])
@pytest.mark.parametrize("k", [2, 3])
def test_edict_matches_reference(setup, leapfrog, k):
    field, grid = setup
    p = 0.93
    solver = get_solver("edict", p=p, leapfrog=leapfrog)
    x, y = _rand(0), _rand(1)
    out = solver.step(field, grid, k, EDICTState(x, y))
    ref = _edict_reference(x, y, k, p, leapfrog, reverse=False)
    assert _close(out.x, ref[0]) and _close(out.y, ref[1])
    back = solver.backward_step(field, grid, k, out)
    ref = _edict_reference(out.x, out.y, k, p, leapfrog, reverse=True)
    assert _close(back.x, ref[0]) and _close(back.y, ref[1])
    assert _close(back.x, x) and _close(back.y, y)


def test_edict_leapfrog_changes_odd_steps_only(setup):
    field, grid = setup
    state = EDICTState(_rand(0), _rand(1))
    on, off = get_solver("edict", leapfrog=True), get_solver("edict", leapfrog=False)
    assert torch.equal(on.step(field, grid, 2, state).x, off.step(field, grid, 2, state).x)
    assert not _close(on.step(field, grid, 3, state).x, off.step(field, grid, 3, state).x)


def _ddim(x, e, i, j):
    return (A[j] / A[i]) * x + (S[j] - S[i] * A[j] / A[i]) * e


def test_bdia_matches_reference(setup):
    field, grid = setup
    gamma, k = 0.96, 3
    solver = get_solver("bdia", gamma=gamma)
    prev, cur = _rand(0), _rand(1)
    out = solver.step(field, grid, k, TwoStepState(cur, noisier=prev))
    e = toy_eps(cur, TS[k])
    new_latent, latent_backward = _ddim(cur, e, k, k + 1), _ddim(cur, e, k, k - 1)
    # guoqiang-zhang-x/BDIA, gamma on x_{k-1}:
    ref = prev - (1 - gamma) * (prev - cur) - gamma * (latent_backward - cur) + (new_latent - cur)
    assert _close(out.x, ref) and torch.equal(out.noisier, cur)
    # inversion (reference §7): x_{k-1} = (x_{k+1} - DDIM_{k->k+1}(x_k)) / gamma + DDIM_{k->k-1}(x_k)
    nxt = _rand(2)
    back = solver.backward_step(field, grid, k - 1, TwoStepState(cur, cleaner=nxt))
    assert _close(back.x, (nxt - new_latent) / gamma + latent_backward) and torch.equal(back.cleaner, cur)


def test_bdia_gamma_one_is_symmetric_leapfrog(setup):
    field, grid = setup
    solver, k = get_solver("bdia", gamma=1.0), 4
    prev, cur = _rand(0), _rand(1)
    out = solver.step(field, grid, k, TwoStepState(cur, noisier=prev))
    e = toy_eps(cur, TS[k])
    # x_{k+1} - x_{k-1} = D(k -> k+1) - D(k -> k-1): the same map with the two neighbours swapped
    ref = prev + ((A[k + 1] - A[k - 1]) / A[k]) * cur + (S[k + 1] - S[k - 1] - S[k] * (A[k + 1] - A[k - 1]) / A[k]) * e
    assert _close(out.x, ref)
    back = solver.backward_step(field, grid, k - 1, TwoStepState(cur, cleaner=out.x))
    assert _close(back.x, prev)


def test_two_step_first_steps_are_ddim(setup):
    field, grid = setup
    x = _rand(0)
    for name in ("bdia", "belm"):
        solver = get_solver(name)
        out = solver.step(field, grid, 0, solver.init_state(x, grid))  # from a plain latent: DDIM
        assert _close(out.x, _ddim(x, toy_eps(x, TS[0]), 0, 1)) and torch.equal(out.noisier, x)
        n = len(TS) - 1  # first inversion step: DDIM inversion with the model at the clean timestep
        back = solver.backward_step(field, grid, n - 1, solver.init_inversion(x, grid))
        assert _close(back.x, _ddim(x, toy_eps(x, TS[n]), n, n - 1)) and torch.equal(back.cleaner, x)


def test_belm_matches_reference(setup):
    field, grid = setup
    solver, k = get_solver("belm"), 3
    prev, cur = _rand(0), _rand(1)
    out = solver.step(field, grid, k, TwoStepState(cur, noisier=prev))
    # zituitui/BELM samplers/BELM.py intermediate_to_latent (p = k-1, t = k, s = k+1):
    alpha_p, alpha_t, alpha_s = A[k - 1], A[k], A[k + 1]
    t_p, t_t, t_s = S[k - 1] / A[k - 1], S[k] / A[k], S[k + 1] / A[k + 1]
    d1, d2, d3 = t_t - t_p, t_s - t_t, t_s - t_p
    coef_1 = d2 * d3 * alpha_s / d1
    coef_2 = (d2 / d1) ** 2 * (alpha_s / alpha_p)
    coef_3 = (d1 - d2) * d3 / (d1**2) * (alpha_s / alpha_t)
    ref = coef_1 * toy_eps(cur, TS[k]) + coef_2 * prev + coef_3 * cur
    assert _close(out.x, ref)
    # latent_to_intermediate: x_i from x_{i-1} (= x_k) and x_{i-2} (= x_{k+1}), i = k-1
    nxt = _rand(2)
    back = solver.backward_step(field, grid, k - 1, TwoStepState(cur, cleaner=nxt))
    a_i, a_i1, a_i2 = A[k - 1], A[k], A[k + 1]
    h_i = S[k - 1] / a_i - S[k] / a_i1
    h_i1 = S[k] / a_i1 - S[k + 1] / a_i2
    ref = (
        (a_i / a_i2) * h_i**2 / h_i1**2 * nxt
        + (a_i / a_i1) * (h_i1**2 - h_i**2) / h_i1**2 * cur
        + a_i * (h_i1 + h_i) * h_i / h_i1 * toy_eps(cur, TS[k])
    )
    assert _close(back.x, ref)


def _lam(i):
    return math.log(A[i] / S[i])


def _f_lambda_x(i, y):
    """d(x/sigma)/dlambda = (alpha/sigma) x0 at grid index i, state y = x/sigma."""
    return (A[i] / S[i]) * _x0(S[i] * y, i)


def test_reversible_heun_matches_reference(setup):
    field, grid = setup
    solver, k = get_solver("reversible_heun"), 2
    x = _rand(0)
    s1 = solver.step(field, grid, k, solver.init_state(x, grid))
    s2 = solver.step(field, grid, k + 1, s1)  # uses the cached slope
    y, z = x / S[k], x / S[k]
    for i in (k, k + 1):  # google-research/torchsde reversible_heun, in (lambda, x/sigma)
        dt = _lam(i + 1) - _lam(i)
        f0 = _f_lambda_x(i, z)
        z = 2 * y - z + f0 * dt
        f1 = _f_lambda_x(i + 1, z)
        y = y + (f0 + f1) * (0.5 * dt)
    assert _close(s2.x, y * S[k + 2]) and _close(s2.z, z * S[k + 2])
    back = solver.backward_step(field, grid, k + 1, s2)
    dt = _lam(k + 2) - _lam(k + 1)
    z0 = 2 * y - z - _f_lambda_x(k + 2, z) * dt
    y0 = y - (_f_lambda_x(k + 1, z0) + _f_lambda_x(k + 2, z)) * (0.5 * dt)
    assert _close(back.x, y0 * S[k + 1]) and _close(back.x, s1.x) and _close(back.z, z0 * S[k + 1])


def test_mf_matches_reference(setup):
    field, grid = setup
    c, k = 0.9, 3
    solver = get_solver("mf", base="heun", coupling=c, form="lambda-x")

    def phi(i, j, y):  # Heun in (lambda, x/sigma) from index i to j
        h = _lam(j) - _lam(i)
        k1 = _f_lambda_x(i, y)
        return y + 0.5 * h * (k1 + _f_lambda_x(j, y + h * k1))

    x, xz = _rand(0), _rand(1)
    out = solver.step(field, grid, k, CoupledState(x, xz))
    y, z = x / S[k], xz / S[k]
    y1 = c * (y - z) + phi(k, k + 1, z)  # sammccallum/diffrax UReversible
    z1 = y1 + z - phi(k + 1, k, y1)
    assert _close(out.x, y1 * S[k + 1]) and _close(out.z, z1 * S[k + 1])
    back = solver.backward_step(field, grid, k, out)
    z0 = z1 - y1 + phi(k + 1, k, y1)
    y0 = (y1 - phi(k, k + 1, z0)) / c + z0
    assert _close(back.x, y0 * S[k]) and _close(back.z, z0 * S[k])


def test_rex_euler_noise_is_mf_coupled_ddim(setup):
    field, grid = setup
    c, k = 0.999, 2
    solver = get_solver("rex", base="euler", mode="noise", coupling=c)
    x, xh = _rand(0), _rand(1)
    out = solver.step(field, grid, k, CoupledState(x, xh))
    # zblasingame/Rex-solver, w = alpha: x' = (w1/w0)(c x + (1-c) xh) + DDIM increment of xh
    x1 = _ddim(c * x + (1 - c) * xh, toy_eps(xh, TS[k]), k, k + 1)
    xh1 = (A[k + 1] / A[k]) * xh - (_ddim(x1, toy_eps(x1, TS[k + 1]), k + 1, k) * (A[k + 1] / A[k]) - x1)
    assert _close(out.x, x1) and _close(out.z, xh1)
    back = solver.backward_step(field, grid, k, out)
    assert _close(back.x, x) and _close(back.z, xh)


def test_rex_data_mode_matches_reference(setup):
    field, grid = setup
    c, k = 0.95, 4
    solver = get_solver("rex", base="heun", mode="data", coupling=c)

    def psi(i, j, x):  # Rex increment, data mode: w = sigma, zeta = alpha/sigma, stages predict x0
        h = A[j] / S[j] - A[i] / S[i]
        k1 = _x0(x, i)
        k2 = _x0(S[j] * (x / S[i] + h * k1), j)
        return h * (0.5 * k1 + 0.5 * k2)

    x, xh = _rand(0), _rand(1)
    out = solver.step(field, grid, k, CoupledState(x, xh))
    w0, w1 = S[k], S[k + 1]
    x1 = (w1 / w0) * (c * x + (1 - c) * xh) + w1 * psi(k, k + 1, xh)
    xh1 = (w1 / w0) * xh - w1 * psi(k + 1, k, x1)
    assert _close(out.x, x1) and _close(out.z, xh1)
    back = solver.backward_step(field, grid, k, out)
    xh0 = (w0 / w1) * xh1 + w0 * psi(k + 1, k, x1)
    x0 = (w0 / w1) * x1 / c + (1 - 1 / c) * xh0 - (w0 / c) * psi(k, k + 1, xh0)
    assert _close(back.x, x0) and _close(back.z, xh0)


def test_dpmpp_2m_matches_reference(setup):
    field, grid = setup
    solver = get_solver("dpmpp_2m")
    x = _rand(0)
    s1 = solver.step(field, grid, 0, solver.init_state(x, grid))
    s2 = solver.step(field, grid, 1, s1)
    # diffusers multistep_dpm_solver_{first,second}_order_update, "dpmsolver++", "midpoint"
    m0 = _x0(x, 0)
    h = _lam(1) - _lam(0)
    x1 = (S[1] / S[0]) * x - A[1] * (math.exp(-h) - 1.0) * m0
    m1 = _x0(x1, 1)
    h, h_0 = _lam(2) - _lam(1), _lam(1) - _lam(0)
    d0, d1 = m1, (1.0 / (h_0 / h)) * (m1 - m0)
    x2 = (S[2] / S[1]) * x1 - A[2] * (math.exp(-h) - 1.0) * d0 - 0.5 * A[2] * (math.exp(-h) - 1.0) * d1
    assert _close(s1.x, x1) and _close(s2.x, x2)
    # inversion: the same formula towards noise with its own history (index 3 -> 2 -> 1)
    b1 = solver.backward_step(field, grid, 2, solver.init_inversion(x, grid))
    b2 = solver.backward_step(field, grid, 1, b1)
    m3 = _x0(x, 3)
    h = _lam(2) - _lam(3)
    y2 = (S[2] / S[3]) * x - A[2] * (math.exp(-h) - 1.0) * m3
    m2 = _x0(y2, 2)
    h, h_0 = _lam(1) - _lam(2), _lam(2) - _lam(3)
    y1 = (S[1] / S[2]) * y2 - A[1] * (math.exp(-h) - 1.0) * (m2 + 0.5 * (h / h_0) * (m2 - m3))
    assert _close(b1.x, y2) and _close(b2.x, y1)


def test_dpmpp_2m_lower_order_final_below_15_steps(mixture):
    """diffusers: the last step is first order when there are fewer than 15 steps."""
    x = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    field = Field(mixture, SCHED)
    solver = get_solver("dpmpp_2m")
    for steps, first_order in ((6, True), (15, False)):
        grid = Grid(SCHED, diffinv.make_grid(SCHED, steps))
        state = solver.init_state(x, grid)
        for k in range(steps - 1):
            state = solver.step(field, grid, k, state)
        last = solver.step(field, grid, steps - 1, state)
        plain = solver.step(field, grid, steps - 1, solver.to_generation(state, grid))  # no history
        assert torch.equal(last.x, plain.x) == first_order


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_matches_diffusers(steps):
    """Parity with diffusers' DPMSolverMultistepScheduler (its sigmas are float32, hence 1e-4)."""
    from diffusers import DPMSolverMultistepScheduler

    ds = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="linspace",
        final_sigmas_type="sigma_min",  # ends at timestep 0 like our grids
        algorithm_type="dpmsolver++",
        solver_order=2,
    )
    sched = diffinv.NoiseSchedule.from_scheduler(ds)
    ds.set_timesteps(steps)
    x = _rand(7)
    ref = x.clone()
    for t in ds.timesteps:
        ref = ds.step(toy_eps(ref, t), t, ref).prev_sample
    grid = [*map(float, ds.timesteps.tolist()), 0.0]
    out = diffinv.generate(toy_eps, x, sched, solver="dpmpp_2m", timesteps=grid)
    assert (out - ref).abs().max() < 1e-4
    assert (diffinv.generate(toy_eps, x, sched, solver="ddim", timesteps=grid) - ref).abs().max() > 1e-2


# -- order of convergence ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def order_problem(mixture):
    """A noise sample at T and its clean end by a tight DOP853 solve in (lambda, x/sigma)."""
    from scipy.integrate import solve_ivp

    x_t = torch.randn(2, 2, 2, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def rhs(lam, y):
        t = SCHED.timestep_of_lam(torch.tensor(lam)).item()
        sigma = SCHED.sigma(t).item()
        yy = torch.from_numpy(y).reshape(x_t.shape)
        return (yy - mixture.eps(sigma * yy, t)).reshape(-1).numpy()

    lam = (SCHED.lam(SCHED.T).item(), SCHED.lam(0.0).item())
    y0 = (x_t / SCHED.sigma(SCHED.T).item()).reshape(-1).numpy()
    sol = solve_ivp(rhs, lam, y0, method="DOP853", rtol=1e-12, atol=1e-12)
    assert sol.success
    return x_t, torch.from_numpy(sol.y[:, -1]).reshape(x_t.shape) * SCHED.sigma(0.0).item()


@pytest.mark.parametrize("name", ["dpmpp_2m", "reversible_heun", "belm"])
def test_order_two(mixture, order_problem, name):
    x_t, ref = order_problem
    errs = [
        (diffinv.generate(mixture, x_t, SCHED, solver=name, steps=n) - ref).abs().max().item() for n in (16, 32, 64)
    ]
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert get_solver(name).order == 2
    assert all(1.8 < s < 2.4 for s in slopes), (errs, slopes)


# -- bad options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,opts,match",
    [
        ("edict", {"p": 0.0}, "p must be in"),
        ("edict", {"p": 1.5}, "p must be in"),
        ("edict", {"p": "high"}, "p must be a number"),
        ("edict", {"leapfrog": "yes"}, "leapfrog must be"),
        ("bdia", {"gamma": 0.0}, "gamma must be positive"),
        ("bdia", {"gamma": -0.5}, "gamma must be positive"),
        ("bdia", {"gamma": float("nan")}, "gamma must be positive"),
        ("bdia", {"gamma": None}, "gamma must be a positive number"),
        ("mf", {"coupling": 0.0}, "coupling must be in"),
        ("mf", {"coupling": 1.01}, "coupling must be in"),
        ("rex", {"coupling": -1}, "coupling must be in"),
        ("mf", {"base": "rk45"}, "unknown tableau 'rk45'"),
        ("rex", {"base": "dopri"}, "unknown tableau 'dopri'"),
        ("rex", {"mode": "latent"}, "mode must be one of noise, data"),
        ("mf", {"form": "beta"}, "unknown ODE form 'beta'"),
        ("reversible_heun", {"form": "beta"}, "unknown ODE form 'beta'"),
        ("belm", {"gamma": 0.5}, "has no option 'gamma'"),
    ],
)
def test_bad_options(name, opts, match):
    with pytest.raises(ValueError, match=match):
        get_solver(name, **opts)


def test_reversible_heun_edit_does_not_reuse_the_inversion_slope(mixture):
    """Reversible Heun caches f(s, z); an edit under another model must evaluate its own first slope."""
    from diffinv.solvers.reversible import ReversibleHeunState

    x0 = mixture.sample(1, generator=torch.Generator().manual_seed(3))
    other = GaussianMixture(SCHED, mixture.mu.reshape(-1, 2, 2, 2) + 0.3, torch.tensor([0.05, 0.1, 0.2]))
    inv = diffinv.invert(mixture, x0, SCHED, solver="reversible_heun", steps=6)
    assert inv.state.f is not None
    field = Field(other, SCHED)
    expected = ReversibleHeunState(inv.state.x, inv.state.z, None)  # slope left for the target model
    for k in range(inv.grid.steps):
        expected = inv.solver.step(field, inv.grid, k, expected)
    assert torch.equal(diffinv.generate(other, inv), expected.x)
    assert field.nfe == inv.grid.steps + 1
    assert (diffinv.generate(mixture, inv) - x0).abs().max() < 1e-12  # still exact with the same model
