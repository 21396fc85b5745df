"""``diffinv edit`` end to end on a saved tiny pipeline, and its one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_sd_pipe

from diffinv import cli
from diffinv.images import psnr
from diffinv.solvers import get_solver, list_solvers

EXACT = [n for n in list_solvers() if get_solver(n).exact]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_sd_pipe().save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(root / "photo.png")
    return root


def _edit(setup, *extra):
    base = [str(setup / "photo.png"), "--source", "a cat", "--model", str(setup / "model"), "--steps", "2"]
    return cli.main(["edit", *base, "--device", "cpu", "--dtype", "fp32", "--no-progress", *extra])


@pytest.mark.parametrize("solver", ["ddim", "ees25", *EXACT[:1]])
def test_edit_writes_numbered_images_and_a_grid(setup, solver, capsys):
    before = (setup / "photo.png").read_bytes()
    out = setup / solver / "edit.png"
    rc = _edit(setup, "--solver", solver, "--target", "a dog", "--target", "a fox", "--out", str(out), "--grid")
    assert rc == 0, capsys.readouterr().err
    for name in ("edit_1.png", "edit_2.png"):
        assert Image.open(setup / solver / name).size == (64, 64)
    grid = Image.open(setup / solver / "edit_grid.png")
    assert grid.width == 4 * 64 and grid.height > 64  # source | recon | 2 edits, captions below
    assert (setup / "photo.png").read_bytes() == before
    printed = capsys.readouterr().out
    # the printed reconstruction PSNR is the PSNR of the grid's reconstruction against its source tile
    tiles = [grid.crop((64 * i, 0, 64 * (i + 1), 64)) for i in range(2)]
    line = next(ln for ln in printed.splitlines() if ln.startswith("reconstruction PSNR: "))
    assert float(line.split()[2]) == pytest.approx(psnr(tiles[0], tiles[1]), abs=0.006)
    # the sidecar maps each file to its prompt, with the settings the editor resolved
    record = json.loads((setup / solver / "edit.json").read_text())
    assert record["outputs"] == {"edit_1.png": {"target_prompt": "a dog"}, "edit_2.png": {"target_prompt": "a fox"}}
    assert record["grid"] == "edit_grid.png" and record["source_prompt"] == "a cat"
    assert record["settings"]["solver"] == solver and record["settings"]["steps"] == 2
    assert record["settings"]["spacing"] == get_solver(solver).reference_spacing  # auto, resolved
    assert record["settings"]["guidance"] == 3.0 and record["seed"] is None
    assert record["versions"]["torch"] == torch.__version__ and "folder_hash" in record["model_revision"]
    assert record["reconstruction_psnr"] == pytest.approx(psnr(tiles[0], tiles[1]), abs=1e-3)
    # the same, per image, in a PNG text chunk
    chunk = json.loads(Image.open(setup / solver / "edit_2.png").text["diffinv"])
    assert chunk["target_prompt"] == "a fox" and chunk["settings"] == record["settings"]


def test_edit_default_output_and_options(setup, capsys):
    rc = _edit(
        setup, "--target", "a dog", "--solver-option", "form=sigma", "--smoothing", "npi", "proximal", "--seed", "3"
    )
    assert rc == 0, capsys.readouterr().err
    assert (setup / "photo_edit.png").is_file()
    record = json.loads((setup / "photo_edit.json").read_text())
    assert record["outputs"] == {"photo_edit.png": {"target_prompt": "a dog"}} and record["seed"] == 3
    assert record["settings"]["solver_options"] == {"form": "sigma"}
    assert record["settings"]["smoothing"] == ["npi", "proximal"] and record["settings"]["guidance"] == 7.5
    assert record["settings"]["inversion_guidance"] is None  # NPI inverts without CFG
    assert "reconstruction_psnr" not in record  # no --grid: no reconstruction
    # Each option took effect: leaving one out changes the edit.
    edited = np.asarray(Image.open(setup / "photo_edit.png"), dtype=np.int16)
    for name, left_out in (
        ("no_form", ["--smoothing", "npi", "proximal"]),
        ("no_smoothing", ["--solver-option", "form=sigma"]),
    ):
        out = setup / f"{name}.png"
        assert _edit(setup, "--target", "a dog", *left_out, "--seed", "3", "--out", str(out)) == 0
        assert np.abs(np.asarray(Image.open(out), dtype=np.int16) - edited).max() > 1, name


def test_edit_with_a_lora_file_merged_or_unmerged(setup, capsys):
    from safetensors.torch import save_file

    unet = tiny_sd_pipe().unet
    gen = torch.Generator().manual_seed(0)
    lora = {}
    for name, module in unet.named_modules():
        if name.endswith(".attn2.to_v"):  # the authors' key format: ...attn2.processor.to_v_lora.{down,up}.weight
            stem = name[: -len(".to_v")] + ".processor.to_v_lora"
            lora[f"{stem}.down.weight"] = torch.randn(2, module.in_features, generator=gen)
            lora[f"{stem}.up.weight"] = torch.randn(module.out_features, 2, generator=gen)
    save_file(lora, str(setup / "lora.safetensors"))
    outs = {}
    for mode in ("merged", "unmerged"):
        extra = ["--lora-unmerged"] if mode == "unmerged" else []
        out = setup / f"lora_{mode}.png"
        rc = _edit(setup, "--target", "a dog", "--lora", str(setup / "lora.safetensors"), "--out", str(out), *extra)
        assert rc == 0, capsys.readouterr().err
        outs[mode] = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(outs["merged"] - outs["unmerged"]).max() <= 1  # the same edit, up to float32 rounding
    assert _edit(setup, "--target", "a dog", "--out", str(setup / "no_lora.png")) == 0
    plain = np.asarray(Image.open(setup / "no_lora.png"), dtype=np.int16)
    assert np.abs(outs["merged"] - plain).max() > 1  # the LoRA changed the edit


@pytest.mark.parametrize("inversion", ["null-text", "direct"])
def test_edit_with_a_pivot_inversion(setup, inversion, capsys):
    """Null-text inversion runs under the command's inference mode (it turns gradients on for itself)."""
    out = setup / inversion / "edit.png"
    rc = _edit(
        setup, "--solver", "ddim", "--guidance", "7.5", "--inversion", inversion, "--target", "a dog", "--out", str(out)
    )
    assert rc == 0, capsys.readouterr().err
    assert Image.open(out).size == (64, 64)
    assert json.loads((setup / inversion / "edit.json").read_text())["settings"]["inversion"] == inversion


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "missing.png"], "not found"),
        (["--image", "corrupt.png"], "corrupt.png"),
        (["--source", ""], "--source prompt is empty"),
        (["--target", "  "], "--target prompt is empty"),
        (["--solver", "nope"], "unknown solver"),
        (["--solver-option", "nope=1"], "no option"),
        (["--solver-option", "novalue"], "KEY=VALUE"),
        (["--steps", "0"], "--steps"),
        (["--steps", "two"], "--steps"),
        (["--strength", "1.5"], "--strength"),
        (["--guidance", "nan"], "--guidance"),
        (["--out", "photo.png"], "overwrite"),
        (["--out", "edit.xyz"], "suffix"),
        (["--smoothing", "blur"], "--smoothing"),
        (["--inversion", "nope"], "--inversion"),
        (["--inversion", "null-text", "--solver", "edict"], "null-text inversion needs a one-step solver"),
        (["--inversion", "null-text", "--solver", "dpmpp_2m"], "null-text inversion needs a one-step solver"),
        (["--inversion", "null-text", "--smoothing", "npi"], "does not combine with smoothing npi"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(setup, capsys, args, message, monkeypatch):
    (setup / "corrupt.png").write_bytes(b"\x89PNG broken")
    monkeypatch.chdir(setup)
    opts = {"--image": "photo.png", "--source": "a cat", "--target": "a dog"}
    rest = []
    for flag, value in zip(args[::2], args[1::2]):
        if flag in opts:
            opts[flag] = value
        else:
            rest += [flag, value]
    argv = ["edit", opts["--image"], "--source", opts["--source"], "--target", opts["--target"]]
    argv += ["--model", str(setup / "model"), "--device", "cpu", "--no-progress", *rest]
    try:
        rc = cli.main(argv)
    except SystemExit as stop:  # argparse rejects bad types and choices itself, also with status 2
        rc = stop.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and message in err, err
