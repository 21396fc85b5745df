"""DDIM and DDIM inversion against diffusers' DDIMScheduler / DDIMInverseScheduler, in float64.

diffusers keeps ``alphas_cumprod`` in float32 and would do its step arithmetic with float32 scalars;
we cast the scheduler's tables to float64 (same values) so that both sides compute in float64 and
the comparison is exact to round-off.

Grid correspondence (generation order, our ``timesteps``): diffusers' 50 "leading" steps with
``steps_offset=1`` are 981, 961, ..., 21, 1, and ``set_alpha_to_one=False`` makes its last step land
on ``alpha_bar[0]``, i.e. our timestep 0: our grid is ``[981, 961, ..., 1, 0]``.
``DDIMInverseScheduler`` (same config) walks ``[1, 21, ..., 981]``; its step at label ``t`` moves the
latent from noise level ``t - 20`` (``alpha_bar[0]`` for the first step, again via
``set_alpha_to_one=False``) to level ``t`` and is given the model evaluated at the TARGET label ``t``
on the SOURCE latent: our DDIM backward step from grid index k+1 to k with
``inversion_timestep="target"`` (model at ``grid[k]``). Its first step evaluates the model at 1 on the
clean latent and maps timestep 0 -> 1.
"""

import pytest
import torch
from diffusers import DDIMInverseScheduler
from helpers import max_abs, mixture
from tiny import float64_copy, sd_ddim_scheduler, tiny_unet, tiny_unet_eps

import diffinv

F64 = torch.float64


def _schedulers(steps: int):
    sched = sd_ddim_scheduler()
    inverse = DDIMInverseScheduler.from_config(sched.config)
    for s in (sched, inverse):
        s.alphas_cumprod = s.alphas_cumprod.to(F64)
        s.set_timesteps(steps)
    sched.final_alpha_cumprod = sched.final_alpha_cumprod.to(F64)
    inverse.initial_alpha_cumprod = inverse.initial_alpha_cumprod.to(F64)
    return sched, inverse


class Recorder:
    """Wraps an eps model and records the timesteps it is called at."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t):
        self.calls.append(float(t))
        return self.model(x, t)


def _models():
    """(name, eps model, start latent) for the analytic mixture and the tiny random UNet, both float64."""
    sched = diffinv.NoiseSchedule.from_scheduler(_schedulers(1)[0])
    mix = mixture(sched, dim=16)
    x_mix = mix.sample(2, generator=torch.Generator().manual_seed(0)).reshape(2, 4, 2, 2)
    mix_eps = lambda x, t: mix(x.reshape(2, 16), t).reshape(x.shape)  # noqa: E731
    torch.manual_seed(0)
    unet = float64_copy(tiny_unet())
    context = torch.randn(1, 4, 32, dtype=F64)
    x_unet = torch.randn(1, 4, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    return [("mixture", mix_eps, x_mix, 50), ("tiny-unet", tiny_unet_eps(unet, context), x_unet, 20)]


MODELS = _models()


@pytest.mark.parametrize(("name", "eps", "x", "steps"), MODELS, ids=[m[0] for m in MODELS])
def test_ddim_generate_equals_diffusers_step_loop(name, eps, x, steps):
    scheduler, _ = _schedulers(steps)
    timesteps = [*scheduler.timesteps.tolist(), 0]
    assert timesteps[:2] == [1000 // steps * (steps - 1) + 1, 1000 // steps * (steps - 2) + 1]
    ref = x.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            ref = scheduler.step(eps(ref, t), t, ref).prev_sample
    sched = diffinv.NoiseSchedule.from_scheduler(scheduler)
    rec = Recorder(eps)
    with torch.no_grad():
        out = diffinv.generate(rec, x, sched, solver="ddim", timesteps=timesteps)
    assert out.dtype == F64
    assert max_abs(out, ref) < 1e-10, max_abs(out, ref)
    assert rec.calls == [float(t) for t in timesteps[:-1]]


@pytest.mark.parametrize(("name", "eps", "x", "steps"), MODELS, ids=[m[0] for m in MODELS])
def test_ddim_target_inversion_equals_ddim_inverse_scheduler(name, eps, x, steps):
    scheduler, inverse = _schedulers(steps)
    assert inverse.timesteps.tolist() == scheduler.timesteps.flip(0).tolist()
    ref, ref_calls = x.clone(), []
    for t in inverse.timesteps:
        ref_calls.append(float(t))
        ref = inverse.step(eps(ref, t), t, ref).prev_sample
    sched = diffinv.NoiseSchedule.from_scheduler(scheduler)
    rec = Recorder(eps)
    timesteps = [*scheduler.timesteps.tolist(), 0]
    inv = diffinv.invert(rec, x, sched, solver="ddim", timesteps=timesteps, inversion_timestep="target")
    assert max_abs(inv.latent, ref) < 1e-10, max_abs(inv.latent, ref)
    assert rec.calls == ref_calls  # model at the target label: 1, 21, ..., 981

    # The first step alone: label 1 evaluated on the clean latent, noise level alpha_bar[0] -> alpha_bar[1].
    first = inverse.step(eps(x, inverse.timesteps[0]), inverse.timesteps[0], x).prev_sample
    ours = diffinv.invert(eps, x, sched, solver="ddim", timesteps=[1, 0], inversion_timestep="target").latent
    assert max_abs(ours, first) < 1e-12


def test_ddim_current_inversion_is_not_the_inverse_scheduler():
    """The default ("current": model at the latent's own timestep, as BELM/Rex) differs from diffusers' inverse."""
    _name, eps, x, steps = MODELS[0]
    scheduler, _ = _schedulers(steps)
    sched = diffinv.NoiseSchedule.from_scheduler(scheduler)
    timesteps = [*scheduler.timesteps.tolist(), 0]
    rec = Recorder(eps)
    diffinv.invert(rec, x, sched, solver="ddim", timesteps=timesteps)
    assert rec.calls == [float(t) for t in timesteps[1:]][::-1]  # 0, 1, 21, ..., 961


@pytest.mark.parametrize("spacing", ["lambda", "time", "sigma"])
def test_ddim_is_euler_in_the_sigma_form(spacing):
    sched = diffinv.NoiseSchedule.scaled_linear()
    mix = mixture(sched)
    x = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    ddim = diffinv.generate(mix, x, sched, solver="ddim", steps=25, spacing=spacing)
    euler = diffinv.generate(mix, x, sched, solver="euler", steps=25, spacing=spacing, form="sigma")
    assert max_abs(ddim, euler) < 1e-12
    x0 = mix.sample(3, generator=torch.Generator().manual_seed(4))
    inv_ddim = diffinv.invert(mix, x0, sched, solver="ddim", steps=25, spacing=spacing).latent
    inv_euler = diffinv.invert(mix, x0, sched, solver="euler", steps=25, spacing=spacing, form="sigma").latent
    assert max_abs(inv_ddim, inv_euler) < 1e-12


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_as_eps_model_recovers_eps_from_every_prediction_type(prediction_type):
    """A model predicting v = alpha eps - sigma x0 or x0 = (x - sigma eps) / alpha (built here from the mixture's exact
    eps) comes back as that eps, at every timestep of the range."""
    sched = diffinv.NoiseSchedule.scaled_linear()
    mix = mixture(sched)
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(3))

    def predict(x, t):
        eps = mix(x, t)
        alpha, sigma = sched.alpha(t).to(F64), sched.sigma(t).to(F64)
        x0 = (x - sigma * eps) / alpha
        return {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[prediction_type]

    adapted = diffinv.as_eps_model(predict, sched, prediction_type)
    for t in (1.0, 20.0, 400.0, 999.0):
        tt = torch.tensor(t, dtype=F64)
        assert max_abs(adapted(x, tt), mix(x, tt)) < 1e-9 * (1 + float(sched.alpha(tt) / sched.sigma(tt))), t
    with pytest.raises(ValueError, match="prediction_type"):
        diffinv.as_eps_model(predict, sched, "x0")


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_ddim_on_other_prediction_types_equals_diffusers_step(prediction_type):
    """The tiny UNet read as a v- (or x0-) model: our DDIM through as_eps_model equals diffusers' DDIMScheduler with
    that prediction_type, step by step over the whole grid."""
    _name, model, x, steps = MODELS[1]
    scheduler, _ = _schedulers(steps)
    theirs = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)
    assert theirs.config.prediction_type == prediction_type
    theirs.alphas_cumprod = theirs.alphas_cumprod.to(F64)
    theirs.final_alpha_cumprod = theirs.final_alpha_cumprod.to(F64)
    theirs.set_timesteps(steps)
    ref = x.clone()
    with torch.no_grad():
        for t in theirs.timesteps:
            ref = theirs.step(model(ref, t), t, ref).prev_sample
        sched = diffinv.NoiseSchedule.from_scheduler(theirs)
        eps = diffinv.as_eps_model(model, sched, prediction_type)
        out = diffinv.generate(eps, x, sched, solver="ddim", timesteps=[*theirs.timesteps.tolist(), 0])
    assert max_abs(out, ref) < 1e-10, max_abs(out, ref)
