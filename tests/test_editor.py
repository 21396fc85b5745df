"""The Editor on tiny random SD 1.x and SDXL pipelines saved to disk and loaded with from_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import damp_unet, tiny_sd_pipe, tiny_sdxl_pipe

import diffinv
from diffinv.solvers import get_solver, list_solvers

EXACT = [n for n in list_solvers() if get_solver(n).exact]
F64 = {"dtype": torch.float64, "device": "cpu", "solver_dtype": torch.float64, "progress": False}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders holding the tiny SD and SDXL pipelines (float32, as a user's download would be)."""
    root = tmp_path_factory.mktemp("pipes")
    dirs = {}
    for name, make in (("sd", tiny_sd_pipe), ("sdxl", tiny_sdxl_pipe)):
        make().save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def pipes(saved):
    """The saved pipelines loaded back in float64 with a damped (smooth) UNet."""
    out = {}
    for name, path in saved.items():
        editor = diffinv.Editor.from_pretrained(path, **F64)
        damp_unet(editor.unet)
        out[name] = editor.pipe
    return out


def photo(h: int = 70, w: int = 90, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def latent(seed: int = 0, n: int = 1) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_from_pretrained_picks_the_pipeline_class(saved):
    for name, path in saved.items():
        editor = diffinv.Editor.from_pretrained(path, device="cpu", progress=False)
        assert editor.is_xl == (name == "sdxl")
        assert type(editor.pipe).__name__ == (
            "StableDiffusionXLPipeline" if name == "sdxl" else "StableDiffusionPipeline"
        )
        assert editor.size == (64, 64) and editor.unet.dtype == torch.float32
    with pytest.raises(ValueError, match="not found"):
        diffinv.Editor.from_pretrained(saved["sd"] / "missing", device="cpu")
    with pytest.raises(ValueError, match="model_index"):
        diffinv.Editor.from_pretrained(saved["sd"] / "unet", device="cpu")


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("solver", EXACT)
def test_exact_solvers_round_trip_in_float64(pipes, kind, solver):
    editor = diffinv.Editor(pipes[kind], solver=solver, steps=3, guidance=2.0, **F64)
    x = latent(1)
    inv = editor.invert_latent(x, "a photo of a cat")
    rec = editor.reconstruct(inv, output_type="latent")
    assert (rec - x).abs().max().item() <= 1e-8


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_ees_round_trip_error_shrinks_with_steps(pipes, kind):
    x = latent(2)
    errors = []
    for steps in (4, 16):
        editor = diffinv.Editor(pipes[kind], solver="ees27", steps=steps, inversion_guidance=1.0, **F64)
        inv = editor.invert_latent(x, "a cat")
        assert inv.nfe == 4 * steps
        errors.append((editor.reconstruct(inv, output_type="latent") - x).abs().max().item())
    assert errors[1] < errors[0] / 100, errors


def test_ddim_reproduces_the_diffusers_pipeline():
    from diffusers import DDIMScheduler

    pipe = tiny_sd_pipe(seed=3)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = pipe("a red house", latents=noise.clone(), num_inference_steps=5, guidance_scale=7.5, output_type="latent")
    ref = ref.images
    editor = diffinv.Editor(pipe, progress=False)
    timesteps = [*pipe.scheduler.timesteps.tolist(), 0]  # DDIM's last step lands on alphas_cumprod[0]
    with torch.inference_mode():
        model = editor.eps_model("a red house", guidance=7.5)
        ours = diffinv.generate(model, noise, editor.schedule, solver="ddim", timesteps=timesteps)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_batched_edit_equals_single_edits(pipes):
    editor = diffinv.Editor(pipes["sd"], solver="heun", steps=2, guidance=4.0, **F64)
    inv = editor.invert_latent(latent(3, n=2), ["a cat", "a dog"])
    targets = ["a tiger", "a lion", "a cat"]
    batched = editor.edit(inv, targets, output_type="latent")
    assert batched.shape == (6, 4, 8, 8) and batched.dtype == torch.float64
    for i in range(2):
        one = diffinv.Editor(pipes["sd"], solver="heun", steps=2, guidance=4.0, **F64)
        single_inv = one.invert_latent(inv.source[i : i + 1], inv.prompts[i])
        for j, target in enumerate(targets):
            single = one.edit(single_inv, [target], output_type="latent")
            assert (single[0] - batched[i * 3 + j]).abs().max().item() <= 1e-10


def test_per_image_targets_equal_each_image_edited_alone(pipes):
    editor = diffinv.Editor(pipes["sd"], solver="ees25", steps=2, smoothing="npi,proximal", **F64)
    inv = editor.invert_latent(latent(4, n=2), ["a cat", "a dog"])
    paired = editor.edit(inv, [["a tiger"], ["a wolf"]], output_type="latent")
    assert paired.shape == (2, 4, 8, 8)
    for i, target in enumerate(["a tiger", "a wolf"]):
        alone = editor.edit(editor.invert_latent(inv.source[i : i + 1], inv.prompts[i]), target, output_type="latent")
        assert (alone[0] - paired[i]).abs().max().item() <= 1e-10
    with pytest.raises(ValueError, match="give 2 lists"):
        editor.edit(inv, [["a tiger"], ["a wolf", "a fox"]])
    with pytest.raises(ValueError, match="per-image targets do not combine with control p2p"):
        editor.edit(inv, [["a tiger"], ["a wolf"]], control="p2p")


def _ddim_loop(x, ts, eps_fn, schedule, backward):
    """An independent DDIM loop: x_j = a_j/a_i x + (s_j - s_i a_j/a_i) eps(x, t_eval)."""
    grid = torch.tensor(ts, dtype=torch.float64)
    a, s = schedule.alpha(grid).tolist(), schedule.sigma(grid).tolist()
    order = range(len(ts) - 1, 0, -1) if backward else range(len(ts) - 1)
    for n in order:
        i, j = (n, n - 1) if backward else (n, n + 1)
        e = eps_fn(x, ts[i])
        x = a[j] / a[i] * x + (s[j] - s[i] * a[j] / a[i]) * e
    return x


def test_npi_follows_its_formulas(pipes):
    pipe, w = pipes["sd"], 5.0
    editor = diffinv.Editor(pipe, solver="ddim", steps=3, smoothing=["npi"], guidance=w, **F64)
    assert editor.guidance == w
    with torch.inference_mode():
        src, tgt = (pipe.encode_prompt([p], "cpu", 1, False)[0] for p in ("a cat", "a dog"))

        def unet(x, t, emb):
            return pipe.unet(x, torch.tensor(t, dtype=torch.float64), encoder_hidden_states=emb).sample

        x0 = latent(4)
        ts = editor.timesteps.tolist()
        # inversion: the conditional source prompt alone (no CFG)
        xt = _ddim_loop(x0, ts, lambda x, t: unet(x, t, src), editor.schedule, backward=True)
        # editing: the source embedding replaces the null embedding
        guided = lambda x, t: unet(x, t, src) + w * (unet(x, t, tgt) - unet(x, t, src))  # noqa: E731
        want = _ddim_loop(xt, ts, guided, editor.schedule, backward=False)
    inv = editor.invert_latent(x0, "a cat")
    assert inv.uncond is None
    assert (inv.latent - xt).abs().max().item() <= 1e-10
    got = editor.edit(inv, "a dog", output_type="latent")
    assert (got - want).abs().max().item() <= 1e-10
    # with the source prompt as target the editing field is the inversion field for any w
    same = editor.edit(inv, "a cat", output_type="latent")
    assert (same - editor.reconstruct(inv, output_type="latent")).abs().max().item() <= 1e-10


def test_proximal_guidance_in_the_editor(pipes):
    plain = diffinv.Editor(pipes["sd"], solver="ees25", steps=4, **F64)
    assert plain.invert_latent(latent(5), "a cat").trajectory is None  # nothing stored without proximal
    editor = diffinv.Editor(pipes["sd"], solver="ees25", steps=4, smoothing=["npi", "proximal"], **F64)
    assert editor.proximal == diffinv.smoothing.ProximalGuidance(quantile=0.75, recon_t=400, recon_lr=1, dilate_mask=1)
    x0 = latent(5)
    inv = editor.invert_latent(x0, "a cat")
    assert sorted(inv.trajectory) == list(range(5))
    assert torch.equal(inv.trajectory[4]["x"], x0)
    # NPI with the source as target: delta is round-off, below a fixed threshold (quantile < 0), so
    # the mask is empty and the last step (t < 400) puts the clean latent back (x - (x - x*)).
    fixed = diffinv.Editor(
        pipes["sd"], solver="ees25", steps=4, smoothing="npi,proximal", proximal={"quantile": -1.0}, **F64
    )
    same = fixed.edit(fixed.invert_latent(x0, "a cat"), ["a cat"], output_type="latent")
    assert (same[0] - x0).abs().max().item() <= 1e-14
    edited = editor.edit(inv, ["a dog", "a cat"], output_type="latent")
    assert torch.isfinite(edited).all() and not torch.equal(edited[0], x0)


def test_images_in_and_out(pipes):
    editor = diffinv.Editor(pipes["sdxl"], solver="ddim", steps=2, **F64)
    inv = editor.invert([photo(), photo(50, 40, seed=1)], "a cat")
    assert len(inv.images) == 2 and all(im.size == (64, 64) for im in inv.images)
    edits = editor.edit(inv, ["a dog", "a fox", "a cow"])
    assert len(edits) == 6 and all(isinstance(e, Image.Image) and e.size == (64, 64) for e in edits)
    assert len(editor.reconstruct(inv)) == 2
    with pytest.raises(ValueError, match="one per image"):
        editor.invert([photo(), photo()], ["a", "b", "c"])
    with pytest.raises(ValueError, match="output_type"):
        editor.edit(inv, "x", output_type="np")


def test_seeds_and_determinism(pipes):
    editor = diffinv.Editor(pipes["sd"], solver="ddim", steps=2, **F64)
    img = photo()
    a = editor.encode_images([img], torch.Generator().manual_seed(7))
    b = editor.encode_images([img], torch.Generator().manual_seed(7))
    c = editor.encode_images([img], torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(editor.encode_images([img]), editor.encode_images([img]))  # posterior mean
    one = editor.edit(editor.invert(img, "a cat"), "a dog", output_type="latent")
    two = editor.edit(editor.invert(img, "a cat"), "a dog", output_type="latent")
    assert torch.equal(one, two)


def test_mixed_precision_keeps_the_solver_state_wide(saved):
    editor = diffinv.Editor.from_pretrained(saved["sd"], dtype=torch.bfloat16, device="cpu", steps=2, progress=False)
    assert editor.unet.dtype == torch.bfloat16
    inv = editor.invert(photo(), "a cat")
    assert inv.state.x.dtype == torch.float32
    out = editor.edit(inv, "a dog", output_type="latent")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="solver_dtype"):
        diffinv.Editor(editor.pipe, solver_dtype=torch.float16)


def test_v_prediction_is_converted_to_eps(pipes):
    pipe = pipes["sd"]
    editor = diffinv.Editor(pipe, **F64)
    editor.prediction_type = "v_prediction"
    x, t = latent(6), torch.tensor(300.0, dtype=torch.float64)
    with torch.inference_mode():
        cond = editor.encode_prompts(["a cat"])
        v = pipe.unet(x, t, encoder_hidden_states=cond.hidden).sample
        eps = editor.unet_eps(x, t, cond)
    a, s = editor.schedule.alpha(300.0).item(), editor.schedule.sigma(300.0).item()
    assert (eps - (s * x + a * v)).abs().max().item() <= 1e-12


def test_settings_are_validated(pipes):
    pipe = pipes["sd"]
    editor = diffinv.Editor(pipe, steps=10, strength=0.5, **F64)
    assert len(editor.timesteps) == 6 and editor.timesteps[0].item() == pytest.approx(0.5 * 999)
    assert editor.guidance == 3.0 and editor.inversion_guidance == 3.0
    assert diffinv.Editor(pipe, guidance=5.0, **F64).inversion_guidance == 5.0
    for bad in (
        {"strength": 0.0},
        {"strength": 1.5},
        {"steps": 0},
        {"guidance": float("nan")},
        {"guidance": -1.0},
        {"solver": "nope"},
        {"smoothing": ["blur"]},
        {"size": (60, 64)},
        {"resize": "zoom"},
        {"solver_options": {"nope": 1}},
    ):
        with pytest.raises(ValueError):
            diffinv.Editor(pipe, **{**F64, **bad})


def test_auto_spacing_puts_each_solver_on_its_reference_grid(pipes):
    from diffusers import DDIMScheduler

    pipe = pipes["sd"]
    reference = DDIMScheduler.from_config(pipe.scheduler.config)
    reference.set_timesteps(10)
    diffusers_grid = [*reference.timesteps.tolist(), 0]  # 901, 801, ..., 1 ("leading", offset 1), then alpha_bar[0]
    for solver in ("ddim", "edict", "bdia", "belm", "rex", "mf", "reversible_heun", "dpmpp_2m"):
        editor = diffinv.Editor(pipe, solver=solver, steps=10, **F64)
        assert editor.spacing == "time", solver
        assert editor.timesteps.tolist() == diffusers_grid, solver
    for solver in ("ees27", "ees25", "rk4", "heun"):
        editor = diffinv.Editor(pipe, solver=solver, steps=10, **F64)
        assert editor.spacing == "lambda", solver
        lam = editor.schedule.lam(editor.timesteps)
        assert torch.allclose(lam.diff(), lam.diff()[0].expand(10), atol=1e-9), solver  # lambda-uniform
    explicit = diffinv.Editor(pipe, solver="edict", steps=10, spacing="lambda", **F64)
    assert explicit.spacing == "lambda" and explicit.timesteps.tolist() != diffusers_grid
    assert diffinv.Editor(pipe, solver="ees27", steps=10, spacing="time", **F64).timesteps.tolist() == diffusers_grid
    # partial inversion on the time grid: the last int(steps * strength) steps, as diffusers' img2img
    half = diffinv.Editor(pipe, solver="ddim", steps=10, strength=0.55, **F64)
    assert half.timesteps.tolist() == diffusers_grid[-6:]
    with pytest.raises(ValueError, match="spacing"):
        diffinv.Editor(pipe, spacing="uniform", **F64)
    with pytest.raises(ValueError, match="spacing 'time'"):
        diffinv.Editor(pipe, solver="ddim", steps=2000, **F64)
