"""Determinism: the same inputs and seed give bitwise-identical outputs on one machine, whatever ran before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import diffinv
from diffinv.solvers import list_solvers

from .common import run_cli
from .test_divergence import MIX, SCHED


def _scramble(seed: int) -> None:
    """Disturb the global RNGs (and leave garbage in torch's allocator) between two runs."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.randn(seed % 97 + 3, 5) @ torch.randn(5, 7)


@pytest.mark.parametrize("solver", list_solvers(SCHED))
def test_invert_and_generate_are_bitwise_reproducible(solver):
    x0 = MIX.sample(3, generator=torch.Generator().manual_seed(4))
    results = []
    for seed in (1, 2):
        _scramble(seed)
        inv = diffinv.invert(MIX, x0.clone(), SCHED, solver=solver, steps=6)
        back = diffinv.generate(MIX, inv)
        noise = torch.randn(2, *MIX.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        sample = diffinv.generate(MIX, noise, SCHED, solver=solver, steps=4, spacing="time")
        results.append((inv.state.tensors(), back, sample))
    (s1, b1, g1), (s2, b2, g2) = results
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert torch.equal(b1, b2) and torch.equal(g1, g2)


def test_tiny_unet_solvers_are_bitwise_reproducible():
    from tiny import damp_unet, tiny_unet, tiny_unet_eps

    unet = damp_unet(tiny_unet())
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))
    model = tiny_unet_eps(unet, context, scale=0.1)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for solver in ("ees27", "edict", "bdia", "dpmpp_2m"):
            runs = []
            for seed in (1, 2):
                _scramble(seed)
                inv = diffinv.invert(model, x0, SCHED, solver=solver, steps=2)
                runs.append((inv.latent, diffinv.generate(model, inv)))
            assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), solver


def test_editor_edits_are_bitwise_reproducible(tiny_model):
    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    outputs = []
    for seed in (1, 2):
        _scramble(seed)
        editor = diffinv.Editor.from_pretrained(tiny_model, device="cpu", steps=3, progress=False)
        inv = editor.invert(photo, "a photo", generator=torch.Generator().manual_seed(5))  # sampled posterior
        edits = editor.edit(inv, ["a painting", "a drawing"])
        latent = editor.edit(inv, ["a painting"], output_type="latent")
        outputs.append(([np.asarray(im).tobytes() for im in edits], latent, inv.latent))
    (e1, l1, i1), (e2, l2, i2) = outputs
    assert e1 == e2 and torch.equal(l1, l2) and torch.equal(i1, i2)


def test_cli_edit_and_demo_are_bitwise_reproducible(tiny_model, tmp_path):
    src = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(src)
    for name in ("a", "b"):
        argv = ["edit", str(src), "--source", "a photo", "--target", "a sketch", "--model", str(tiny_model)]
        code, _, err = run_cli(
            [*argv, "--steps", "2", "--seed", "7", "--no-progress", "--out", str(tmp_path / f"{name}.png")]
        )
        assert code == 0, err
        demo = ["demo", "--steps", "3", "--images", "1", "--solvers", "ddim,ees27,bdia", "--reference-steps", "8"]
        code, _, err = run_cli([*demo, "--no-progress", "--seed", "3", "--out", str(tmp_path / f"demo_{name}")])
        assert code == 0, err
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    for csv_name in ("demo.csv", "demo_edits.csv"):
        assert (tmp_path / "demo_a" / csv_name).read_bytes() == (tmp_path / "demo_b" / csv_name).read_bytes()
