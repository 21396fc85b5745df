"""Model families against diffusers' own pipelines, in float64: conditioning, guidance, prediction types, VAE scaling.

A round trip cannot see these: inversion and regeneration share the conditioning and the VAE normalisation, so an
exact solver reconstructs exactly whatever they are. Here our DDIM generation on diffusers' timesteps is compared
with the pipeline's own denoising loop from the same latents, and our latents with the VAE posterior mean scaled
as diffusers' pipelines scale it (formulas written out below, not taken from diffinv).

diffusers' SDXL pipeline zeroes the unconditional branch when ``negative_prompt`` is left at ``None`` and the model
sets ``force_zeros_for_empty_prompt``; the Editor's default negative prompt ``""`` means the same thing.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler
from helpers import max_abs
from tiny import tiny_sd_pipe, tiny_sdxl_pipe

import diffinv
from diffinv.families import family_of

F64 = {"dtype": torch.float64, "device": "cpu", "solver_dtype": torch.float64, "progress": False}


def _ddim_pipe(make, prediction_type: str = "epsilon"):
    """A tiny pipeline in float64 whose scheduler is SD's DDIM (tables in float64, as tests/test_parity_diffusers)."""
    pipe = make().to(torch.float64)
    pipe.scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe.scheduler.alphas_cumprod = pipe.scheduler.alphas_cumprod.to(torch.float64)
    pipe.scheduler.final_alpha_cumprod = pipe.scheduler.final_alpha_cumprod.to(torch.float64)
    return pipe


def _latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _ours(pipe, prompt: str, guidance: float, steps: int, x: torch.Tensor) -> torch.Tensor:
    editor = diffinv.Editor(pipe, solver="ddim", steps=steps, spacing="time", guidance=guidance, **F64)
    with torch.inference_mode():
        return diffinv.generate(editor.eps_model(prompt), x, editor.schedule, solver="ddim", timesteps=editor.timesteps)


def _theirs(pipe, prompt: str, guidance: float, steps: int, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return pipe(
            prompt, num_inference_steps=steps, guidance_scale=guidance, latents=x.clone(), output_type="latent"
        ).images


@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_ddim_generation_equals_the_diffusers_pipeline(force_zeros):
    """Prompt + empty negative prompt, guidance 4: text states of both encoders, pooled embedding, time ids
    ``(h, w, 0, 0, h, w)`` and the zeroed (or encoded) empty prompt all as StableDiffusionXLPipeline has them."""
    pipe = _ddim_pipe(tiny_sdxl_pipe)
    pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    x = _latents(1)
    theirs = _theirs(pipe, "a photo of a cat", 4.0, 4, x)
    ours = _ours(pipe, "a photo of a cat", 4.0, 4, x)
    assert max_abs(ours, theirs) < 1e-10, max_abs(ours, theirs)
    # The two settings really differ on this model (so each case tests its own branch).
    pipe.register_to_config(force_zeros_for_empty_prompt=not force_zeros)
    assert max_abs(_theirs(pipe, "a photo of a cat", 4.0, 4, x), theirs) > 1e-6


def test_sdxl_time_ids_reach_the_unet():
    """The time ids change the output of this tiny UNet, so the parity above pins their layout."""
    pipe = _ddim_pipe(tiny_sdxl_pipe)
    family = family_of(pipe)
    cond = family.encode_prompts(["a cat"], (64, 64))
    assert cond.extra["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]
    x, t = _latents(2), torch.tensor(500.0, dtype=torch.float64)
    with torch.inference_mode():
        base = family.denoise(x, t, cond)
        cond.extra["time_ids"] = cond.extra["time_ids"][:, [0, 1, 4, 5, 2, 3]]
        assert max_abs(family.denoise(x, t, cond), base) > 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_sd_ddim_generation_equals_the_diffusers_pipeline(prediction_type):
    """SD 1.x with CFG for every prediction type: the Editor converts v and x0 to eps as DDIMScheduler.step does."""
    pipe = _ddim_pipe(tiny_sd_pipe, prediction_type)
    x = _latents(3)
    theirs = _theirs(pipe, "a photo of a cat", 3.0, 4, x)
    ours = _ours(pipe, "a photo of a cat", 3.0, 4, x)
    assert max_abs(ours, theirs) < 1e-10, max_abs(ours, theirs)


# -- VAE: images <-> latents ---------------------------------------------------------------------------------


def _vae(**config) -> AutoencoderKL:
    torch.manual_seed(5)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        **config,
    ).to(torch.float64)


def _family(kind: str, vae: AutoencoderKL | None):
    pipe = (tiny_sd_pipe if kind == "sd" else tiny_sdxl_pipe)().to(torch.float64)
    if vae is not None:
        pipe.vae = vae
    return family_of(pipe)


VAES = {
    "default": {},  # SD 1.x: scaling 0.18215
    "sdxl-scale": {"scaling_factor": 0.13025},
    "shift": {"scaling_factor": 0.3611, "shift_factor": 0.1159},  # FLUX's VAE config (SD3: 1.5305, 0.0609)
    "latent-stats": {"scaling_factor": 0.5, "latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [1.5, 0.5, 2.0, 1.0]},
}


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("vae_config", list(VAES), ids=list(VAES))
def test_latents_are_the_scaled_vae_posterior_mean(kind, vae_config):
    config = VAES[vae_config]
    family = _family(kind, _vae(**config) if config else None)
    vae = family.vae
    pixels = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scale = vae.config.scaling_factor
    assert scale == config.get("scaling_factor", 0.18215)
    shift = config.get("shift_factor", 0.0)
    view = (1, 4, 1, 1)
    mean = torch.tensor(config.get("latents_mean", [0.0] * 4), dtype=torch.float64).view(view)
    std = torch.tensor(config.get("latents_std", [1.0] * 4), dtype=torch.float64).view(view)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist.mean
        # diffusers: SD img2img ``scaling_factor * z``; SD3/FLUX ``(z - shift_factor) * scaling_factor``;
        # SDXL with latent statistics ``(z - latents_mean) * scaling_factor / latents_std``.
        expected = (posterior - shift - mean) * scale / std
        latents = family.encode_images(pixels, torch.float64)
        assert max_abs(latents, expected) < 1e-12, max_abs(latents, expected)
        z = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        decoded = vae.decode(z * std / scale + mean + shift).sample
        assert max_abs(family.decode_latents(z), decoded) < 1e-12
