"""Memory and speed options (diffinv.runtime): CPU offload, VAE tiling/slicing, torch.compile, and their CLI flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_sd_pipe

from diffinv import cli
from diffinv.editor import Editor

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _edit_latent(**options) -> tuple[Editor, torch.Tensor, torch.Tensor]:
    editor = Editor(tiny_sd_pipe(), solver="ees25", steps=3, progress=False, **options)
    inv = editor.invert(IMAGE, "a cat")
    return editor, editor.edit(inv, ["a dog"], output_type="latent"), editor.reconstruct(inv, output_type="latent")


@pytest.fixture(scope="module")
def eager():
    return _edit_latent()


def test_model_offload_installs_diffusers_hooks_and_changes_nothing(eager):
    editor, edit, recon = _edit_latent(offload="model", device="cpu")
    # every model carries accelerate's offload hook and the editor computes on the offload device
    assert all(hasattr(m, "_hf_hook") for m in (editor.pipe.unet, editor.pipe.vae, editor.pipe.text_encoder))
    assert editor.pipe._offload_device == torch.device("cpu:0") and editor.device == torch.device("cpu:0")
    assert editor.offload == "model"
    assert torch.equal(edit, eager[1]) and torch.equal(recon, eager[2])


def test_vae_tiling_and_slicing_are_the_vae_own_switches(eager):
    editor, edit, _ = _edit_latent(vae_tiling=True, vae_slicing=True)
    assert editor.pipe.vae.use_tiling and editor.pipe.vae.use_slicing
    assert torch.allclose(edit, eager[1], atol=1e-6)
    plain = Editor(tiny_sd_pipe(), progress=False)
    assert not plain.pipe.vae.use_tiling and not plain.pipe.vae.use_slicing


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"offload": "layers"}, "unknown offload 'layers'"),
        ({"offload": "sequential", "device": "cpu"}, "needs a GPU"),
        ({"compile": "fastest"}, "unknown compile mode 'fastest'"),
        ({"compile": 1}, "compile must be True, False or a torch.compile mode"),
    ],
)
def test_bad_runtime_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Editor(tiny_sd_pipe(), progress=False, **options)


def test_compile_equals_eager():
    f64 = {"dtype": torch.float64, "solver_dtype": torch.float64}
    _, edit, recon = _edit_latent(**f64)
    try:
        editor, edit_c, recon_c = _edit_latent(compile="default", **f64)
    except Exception as err:  # no C++ compiler or an unsupported platform for inductor
        pytest.skip(f"torch.compile cannot run here: {type(err).__name__}: {str(err)[:200]}")
    assert editor.unet._compiled_call_impl is not None  # the UNet itself was compiled, in place
    # fused kernels round differently, so not bitwise: one UNet call differs by ~1e-9 relative in float64 (inductor's
    # CPU kernels), a whole 3-step invert + edit by 2e-7 (measured); float32 runs differ by ~1e-4 relative
    assert (edit_c - edit).abs().max() <= 1e-6 * edit.abs().max()
    assert (recon_c - recon).abs().max() <= 1e-6 * recon.abs().max()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-cli")
    tiny_sd_pipe().save_pretrained(root / "model")
    IMAGE.save(root / "photo.png")
    return root


def _cli_edit(root, *extra) -> int:
    args = [str(root / "photo.png"), "--source", "a cat", "--target", "a dog", "--model", str(root / "model")]
    args += ["--steps", "2", "--device", "cpu", "--dtype", "fp32", "--no-progress", "--out", str(root / "e.png")]
    try:
        return cli.main(["edit", *args, *extra])
    except SystemExit as stop:  # argparse rejects bad choices itself, with status 2
        return stop.code


def test_edit_flags_reach_the_editor_and_the_sidecar(model_dir, capsys):
    assert _cli_edit(model_dir, "--offload", "model", "--vae-tiling", "--vae-slicing") == 0, capsys.readouterr().err
    settings = json.loads((model_dir / "e.json").read_text())["settings"]
    assert settings["offload"] == "model" and settings["vae_tiling"] and settings["vae_slicing"]
    assert settings["compile"] is False and settings["device"] == "cpu:0"


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--compile", "fastest"], "invalid choice: 'fastest'"), (["--offload", "sequential"], "needs a GPU")],
)
def test_edit_bad_runtime_flags_are_one_line_errors(model_dir, capsys, flags, message):
    assert _cli_edit(model_dir, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
