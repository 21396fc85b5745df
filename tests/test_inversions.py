"""Null-text inversion and DirectInversion: against transcriptions of the official code, and what they promise.

Official code transcribed below: google/prompt-to-prompt ``null_text_w_ptp.ipynb`` ``NullInversion`` (as
cure-lab/PnPInversion ``models/p2p/inversion.py`` copies it) and PnPInversion's ``DirectInversion.offset_calculate``
with ``models/p2p/p2p_guidance_forward.py``'s ``direct_inversion_p2p_guidance_diffusion_step``.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as nnf
from tiny import damp_unet, tiny_sd_pipe, tiny_sdxl_pipe, tiny_text_sd_pipe

import diffinv
from diffinv.schedules import NoiseSchedule
from diffinv.solvers import get_solver, list_solvers

F64 = {"device": "cpu", "dtype": torch.float64, "solver_dtype": torch.float64, "progress": False}
ONE_STEP = ["ddim", "euler", "heun", "midpoint", "ralston", "rk4", "ees25", "ees27", "ees25_sym", "ees27_sym"]
REFUSED = [n for n in list_solvers(NoiseSchedule.scaled_linear()) if n not in ONE_STEP]
SOURCE, TARGET = "a photo of a cat", "a photo of a dog"
OFFICIAL_DDIM = {"inversion_timestep": "target"}  # NullInversion.next_step evaluates eps at the noisier timestep


@pytest.fixture(scope="module")
def text_pipe():
    return tiny_text_sd_pipe()


@pytest.fixture(scope="module")
def text_pipe64():
    return tiny_text_sd_pipe().to(torch.float64)


@pytest.fixture(scope="module")
def pipe64():
    pipe = tiny_sd_pipe().to(torch.float64)
    damp_unet(pipe.unet)
    return pipe


def latent(seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)


class Official:
    """A transcription of the official NullInversion / DirectInversion (one prompt, the pipeline's scheduler)."""

    def __init__(self, pipe, steps: int, guidance: float):
        self.unet, self.scheduler, self.guidance = pipe.unet, copy.deepcopy(pipe.scheduler), guidance
        self.scheduler.set_timesteps(steps)
        # diffusers keeps alphas_cumprod in float32; the float64 values (ours) keep the comparison at round-off.
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.double()
        self.scheduler.final_alpha_cumprod = self.scheduler.final_alpha_cumprod.double()
        self.num_ddim_steps = steps

    def prev_step(self, model_output, timestep, sample):
        s = self.scheduler
        prev_timestep = timestep - s.config.num_train_timesteps // s.num_inference_steps
        alpha_prod_t = s.alphas_cumprod[timestep]
        alpha_prod_t_prev = s.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else s.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        pred_sample_direction = (1 - alpha_prod_t_prev) ** 0.5 * model_output
        return alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction

    def next_step(self, model_output, timestep, sample):
        s = self.scheduler
        timestep, next_timestep = (
            min(timestep - s.config.num_train_timesteps // s.num_inference_steps, 999),
            timestep,
        )
        alpha_prod_t = s.alphas_cumprod[timestep] if timestep >= 0 else s.final_alpha_cumprod
        alpha_prod_t_next = s.alphas_cumprod[next_timestep]
        beta_prod_t = 1 - alpha_prod_t
        next_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        next_sample_direction = (1 - alpha_prod_t_next) ** 0.5 * model_output
        return alpha_prod_t_next**0.5 * next_original_sample + next_sample_direction

    def get_noise_pred_single(self, latents, t, context):
        return self.unet(latents, t, encoder_hidden_states=context)["sample"]

    def get_noise_pred(self, latents, t, context, is_forward=True):
        latents_input = torch.cat([latents] * 2)
        guidance_scale = 1 if is_forward else self.guidance
        noise_pred = self.unet(latents_input, t, encoder_hidden_states=context)["sample"]
        noise_pred_uncond, noise_prediction_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + guidance_scale * (noise_prediction_text - noise_pred_uncond)
        if is_forward:
            return self.next_step(noise_pred, t, latents)
        return self.prev_step(noise_pred, t, latents)

    @torch.no_grad()
    def ddim_loop(self, latent, context):
        _uncond_embeddings, cond_embeddings = context.chunk(2)
        all_latent = [latent]
        latent = latent.clone().detach()
        for i in range(self.num_ddim_steps):
            t = self.scheduler.timesteps[len(self.scheduler.timesteps) - i - 1]
            noise_pred = self.get_noise_pred_single(latent, t, cond_embeddings)
            latent = self.next_step(noise_pred, t, latent)
            all_latent.append(latent)
        return all_latent

    def null_optimization(self, latents, context, num_inner_steps=10, epsilon=1e-5):
        uncond_embeddings, cond_embeddings = context.chunk(2)
        uncond_embeddings_list = []
        latent_cur = latents[-1]
        for i in range(self.num_ddim_steps):
            uncond_embeddings = uncond_embeddings.clone().detach()
            uncond_embeddings.requires_grad = True
            optimizer = torch.optim.Adam([uncond_embeddings], lr=1e-2 * (1.0 - i / 100.0))
            latent_prev = latents[len(latents) - i - 2]
            t = self.scheduler.timesteps[i]
            with torch.no_grad():
                noise_pred_cond = self.get_noise_pred_single(latent_cur, t, cond_embeddings)
            for _j in range(num_inner_steps):
                noise_pred_uncond = self.get_noise_pred_single(latent_cur, t, uncond_embeddings)
                noise_pred = noise_pred_uncond + self.guidance * (noise_pred_cond - noise_pred_uncond)
                latents_prev_rec = self.prev_step(noise_pred, t, latent_cur)
                loss = nnf.mse_loss(latents_prev_rec, latent_prev)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss_item = loss.item()
                if loss_item < epsilon + i * 2e-5:
                    break
            uncond_embeddings_list.append(uncond_embeddings[:1].detach())
            with torch.no_grad():
                context = torch.cat([uncond_embeddings, cond_embeddings])
                latent_cur = self.get_noise_pred(latent_cur, t, context, False)
        return uncond_embeddings_list

    @torch.no_grad()
    def offset_calculate(self, latents, context):
        noise_loss_list = []
        latent_cur = latents[-1]
        for i in range(self.num_ddim_steps):
            latent_prev = latents[len(latents) - i - 2]
            t = self.scheduler.timesteps[i]
            noise_pred = self.get_noise_pred_single(torch.concat([latent_cur] * 2), t, context)
            noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
            noise_pred_w_guidance = noise_pred_uncond + self.guidance * (noise_pred_cond - noise_pred_uncond)
            latents_prev_rec = self.prev_step(noise_pred_w_guidance, t, latent_cur)
            loss = latent_prev - latents_prev_rec
            noise_loss_list.append(loss.detach())
            latent_cur = latents_prev_rec + loss
        return noise_loss_list

    @torch.no_grad()
    def direct_forward(self, latent, context, noise_loss_list):
        latents = latent
        for i, t in enumerate(self.scheduler.timesteps):
            noise_pred = self.unet(torch.cat([latents] * 2), t, encoder_hidden_states=context)["sample"]
            noise_pred_uncond, noise_prediction_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + self.guidance * (noise_prediction_text - noise_pred_uncond)
            latents = self.scheduler.step(noise_pred, t, latents)["prev_sample"]
            latents = torch.concat((latents[:1] + noise_loss_list[i][:1], latents[1:]))
        return latents


def _context(editor) -> torch.Tensor:
    return torch.cat([editor.encode_prompts([""]).hidden, editor.encode_prompts([SOURCE]).hidden])


# -- null-text inversion ------------------------------------------------------------------------------------------


def test_null_text_matches_the_official_null_optimization(text_pipe64):
    steps = 6
    editor = diffinv.Editor(text_pipe64, solver="ddim", solver_options=OFFICIAL_DDIM, steps=steps, guidance=7.5, **F64)
    x = latent(3)
    inv = editor.invert_latent(x, SOURCE, method="null-text")
    official = Official(text_pipe64, steps, 7.5)
    context = _context(editor)
    pivot = official.ddim_loop(x, context)
    want = torch.stack(official.null_optimization(pivot, context))
    assert inv.null_embeddings.shape == want.shape == (steps, 1, 77, 32)
    assert (inv.null_embeddings - want).abs().max().item() < 1e-9
    assert (inv.latent - pivot[-1]).abs().max().item() < 1e-12  # the pivot is the official one, too
    # The optimisation did something: the embeddings moved away from the null prompt's and differ per step.
    assert (want[0] - context[:1]).abs().max().item() > 1e-3
    assert (want[-1] - want[0]).abs().max().item() > 1e-3


def test_null_text_reconstructs_10x_closer_than_plain_ddim_at_guidance_7_5(text_pipe):
    x = latent(0, torch.float32)
    options = {"solver": "ddim", "steps": 10, "guidance": 7.5, "device": "cpu", "progress": False}
    editor = diffinv.Editor(text_pipe, **options)

    def error(inv) -> float:
        return (editor.reconstruct(inv, output_type="latent") - x).norm().item()

    plain = error(editor.invert_latent(x, SOURCE))  # inverted and regenerated at 7.5
    pivot = diffinv.Editor(text_pipe, inversion_guidance=1.0, **options)
    pivot_only = (pivot.reconstruct(pivot.invert_latent(x, SOURCE), output_type="latent") - x).norm().item()
    inv = editor.invert_latent(x, SOURCE, method="null-text")
    nti = error(inv)
    assert plain / nti >= 10 and pivot_only / nti >= 10, (plain, pivot_only, nti)
    # Without the stored embeddings the same inversion is the pivot regenerated at 7.5: far off.
    assert error(dataclasses.replace(inv, null_embeddings=None)) > 5 * nti


def test_null_text_embeddings_drive_edit_and_p2p(text_pipe):
    editor = diffinv.Editor(text_pipe, solver="ddim", steps=4, guidance=7.5, device="cpu", progress=False)
    inv = editor.invert_latent(latent(1, torch.float32), SOURCE, method="null-text")
    rec = editor.reconstruct(inv, output_type="latent")
    same = editor.edit(inv, [SOURCE], output_type="latent")  # the source prompt: the reconstruction
    assert (same - rec).abs().max().item() < 1e-5
    edited = editor.edit(inv, [TARGET], output_type="latent")
    plain_null = editor.edit(dataclasses.replace(inv, null_embeddings=None), [TARGET], output_type="latent")
    assert (edited - plain_null).abs().max().item() > 1e-2
    p2p = editor.edit(inv, [SOURCE], output_type="latent", control="p2p")  # P2P's source branch: the same field
    assert (p2p - rec).abs().max().item() < 1e-4
    assert (editor.control.source_result - rec).abs().max().item() < 1e-4


def test_null_text_runs_with_gradients_whatever_the_callers_mode(text_pipe):
    editor = diffinv.Editor(text_pipe, solver="ddim", steps=3, guidance=7.5, device="cpu", progress=False)
    x = latent(2, torch.float32)
    plain = editor.invert_latent(x, SOURCE, method="null-text").null_embeddings
    with torch.inference_mode():  # as the CLI runs it
        cli = editor.invert_latent(x, SOURCE, method="null-text").null_embeddings
        assert torch.is_inference_mode_enabled()
    with torch.no_grad():
        no_grad = editor.invert_latent(x, SOURCE, method="null-text").null_embeddings
        assert not torch.is_grad_enabled()
    assert torch.equal(plain, cli) and torch.equal(plain, no_grad)
    assert not plain.requires_grad
    assert all(p.grad is None for p in editor.unet.parameters())  # only the embedding was differentiated


def test_null_text_beyond_ddim_with_a_runge_kutta_solver(text_pipe):
    """Gradients flow through every stage of the step, so a one-step RK solver (here EES(2,5), 3 stages) gets NTI
    as DDIM does, on a grid where its own steps are accurate (lambda-uniform). Where a step is far off at guidance
    1 (Euler or RK4 across the time grid's last step, 1 -> 0) no embedding brings the guided step onto the pivot."""
    x = latent(0, torch.float32)
    editor = diffinv.Editor(text_pipe, solver="ees25", steps=8, guidance=7.5, device="cpu", progress=False)
    plain = (editor.reconstruct(editor.invert_latent(x, SOURCE), output_type="latent") - x).norm().item()
    inv = editor.invert_latent(x, SOURCE, method="null-text")
    nti = (editor.reconstruct(inv, output_type="latent") - x).norm().item()
    assert plain / nti >= 10, (plain, nti)  # measured: 19.5 -> 1.23


def test_null_text_options_are_checked(text_pipe):
    editor = diffinv.Editor(text_pipe, solver="ddim", steps=2, guidance=7.5, device="cpu", progress=False)
    x = latent(0, torch.float32)
    inv = editor.invert_latent(x, SOURCE, method="null-text", inner_steps=0)  # no optimisation: the null prompt
    null = editor.encode_prompts([""]).hidden
    assert all(torch.equal(e, null) for e in inv.null_embeddings)
    with pytest.raises(ValueError, match="unknown null-text inversion option 'lr_decay'"):
        editor.invert_latent(x, SOURCE, method="null-text", lr_decay=0.1)
    with pytest.raises(ValueError, match="unknown direct inversion option 'inner_steps'"):
        editor.invert_latent(x, SOURCE, method="direct", inner_steps=3)
    with pytest.raises(ValueError, match="inner_steps must be an integer"):
        editor.invert_latent(x, SOURCE, method="null-text", inner_steps=-1)
    with pytest.raises(ValueError, match="unknown inversion method 'edict'"):
        editor.invert_latent(x, SOURCE, method="edict")


# -- DirectInversion ----------------------------------------------------------------------------------------------


def test_direct_inversion_matches_the_official_offsets_and_forward(text_pipe64):
    steps = 5
    editor = diffinv.Editor(text_pipe64, solver="ddim", solver_options=OFFICIAL_DDIM, steps=steps, guidance=7.5, **F64)
    x = latent(4)
    inv = editor.invert_latent(x, SOURCE, method="direct")
    official = Official(text_pipe64, steps, 7.5)
    context = _context(editor)
    pivot = official.ddim_loop(x, context)
    offsets = official.offset_calculate(pivot, context)
    assert (inv.offsets - torch.stack(offsets)).abs().max().item() < 1e-10
    assert torch.stack(offsets).abs().max().item() > 1e-3  # guidance 7.5 leaves the pivot: offsets are not 0
    want = official.direct_forward(pivot[-1], context, offsets)
    got = editor.reconstruct(inv, output_type="latent")
    assert (got - want).abs().max().item() < 1e-10
    assert (got - x).abs().max().item() < 1e-10


@pytest.mark.parametrize("solver", list_solvers(NoiseSchedule.scaled_linear()))
def test_direct_inversion_source_branch_ends_on_the_source(pipe64, solver):
    """Every solver: the offsets are taken along the state the corrected source branch carries (a cached
    derivative, a second latent), so multistep, two-step and coupled solvers end on the source as DDIM does."""
    editor = diffinv.Editor(pipe64, solver=solver, steps=3, guidance=7.5, **F64)
    x = latent(5)
    inv = editor.invert_latent(x, SOURCE, method="direct")
    assert (editor.reconstruct(inv, output_type="latent") - x).abs().max().item() <= 1e-8
    editor.edit(inv, [TARGET], output_type="latent", control="p2p")  # the P2P source branch gets the offsets
    assert (editor.control.source_result - x).abs().max().item() <= 1e-8
    plain = editor.reconstruct(dataclasses.replace(inv, offsets=None), output_type="latent")
    assert (plain - x).abs().max().item() > 1e-4  # without them the guided pass misses


def test_both_inversions_on_sdxl():
    """SDXL: the pooled embedding and time ids stay the null prompt's; the text states are optimised."""
    pipe = tiny_sdxl_pipe().to(torch.float64)
    damp_unet(pipe.unet)
    editor = diffinv.Editor(pipe, solver="ddim", steps=3, guidance=7.5, **F64)
    x = latent(6)
    inv = editor.invert_latent(x, SOURCE, method="direct")
    assert (editor.reconstruct(inv, output_type="latent") - x).abs().max().item() <= 1e-8
    editor.edit(inv, [TARGET], output_type="latent", control="p2p")
    assert (editor.control.source_result - x).abs().max().item() <= 1e-8
    nti = editor.invert_latent(x, SOURCE, method="null-text")
    assert nti.null_embeddings.shape == (3, 1, 77, 64)
    edited = editor.edit(nti, [TARGET], output_type="latent", control="p2p")
    plain_null = editor.edit(
        dataclasses.replace(nti, null_embeddings=None), [TARGET], output_type="latent", control="p2p"
    )
    assert (edited - plain_null).abs().max().item() > 1e-6


@pytest.mark.parametrize("solver", REFUSED)
def test_null_text_refuses_solvers_with_a_second_state_with_the_reason(pipe64, solver):
    editor = diffinv.Editor(pipe64, solver=solver, steps=2, guidance=7.5, **F64)
    with pytest.raises(ValueError, match=f"needs a one-step solver.*{get_solver(solver).name} carries"):
        editor.invert_latent(latent(0), SOURCE, method="null-text")


def test_pivot_inversions_refuse_npi_and_proximal(pipe64):
    editor = diffinv.Editor(pipe64, solver="ddim", steps=2, smoothing="npi", **F64)
    with pytest.raises(ValueError, match="does not combine with smoothing"):
        editor.invert_latent(latent(0), SOURCE, method="direct")
