"""Safe loading: weights come from safetensors, or (opt-in) from torch.load(weights_only=True); nothing is
ever unpickled beyond tensors; LoRA files are checked key by key before the UNet changes."""

from __future__ import annotations

import ast
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fuzz
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

import diffinv
from diffinv.smoothing import load_lora, read_lora_file

from .common import assert_one_line_error, run_cli

SRC = Path(diffinv.__file__).parent


class _Payload:
    """Unpickling this runs ``os.system``: proof of code execution if the marker file appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _peft_lora(unet: torch.nn.Module, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A PEFT-format LoRA (``lora_A``/``lora_B``) on every attention projection of ``unet``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and re.search(r"attn\d\.(to_q|to_k|to_v|to_out\.0)$", name):
            out[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.01
            out[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.01
    return out


@pytest.fixture(scope="module")
def unet():
    from tiny import tiny_unet

    return tiny_unet()


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pickled_lora_is_refused_without_the_flag_and_never_executes(unet, tmp_path):
    lora = _peft_lora(unet)
    plain = tmp_path / "lora.bin"
    torch.save(lora, plain)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    torch.save({"x": _Payload(marker)}, evil)

    before = _weights(unet)
    with pytest.raises(ValueError, match="allow_pickle"):
        read_lora_file(plain)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_lora(unet, plain)
    for allow in (False, True):
        with pytest.raises(ValueError, match=r"cannot read LoRA file|allow_pickle"):
            load_lora(unet, evil, allow_pickle=allow)
    assert not marker.exists()  # the payload never ran
    assert _same(before, _weights(unet))

    assert read_lora_file(plain, allow_pickle=True).keys() == lora.keys()  # opt-in: tensors only
    safe = tmp_path / "lora.safetensors"
    save_file(lora, str(safe))
    assert read_lora_file(safe).keys() == lora.keys()


def test_no_unsafe_deserialisation_anywhere_in_the_library():
    """Every torch.load passes weights_only=True; no pickle/marshal/eval loading; from_pretrained is explicit."""
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "dill", "marshal", "cloudpickle"} & set(names), (path, node.lineno)
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name.endswith("torch.load") or name.endswith("load_state_dict_from_url"):
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kw.get("weights_only") == "True", f"{path.name}:{node.lineno}: {ast.unparse(node)}"
            assert name not in ("eval", "exec"), (path, node.lineno)


def test_lora_checked_before_the_unet_changes_first_bad_key_named(unet):
    lora = _peft_lora(unet)
    keys = sorted(lora)
    cases = [
        ({keys[3]: torch.zeros(2, 7)}, keys[3]),  # wrong input size (or a down/up that do not chain)
        ({keys[0]: torch.zeros(2, 2, 2)}, keys[0]),  # not a matrix
        (
            {"down_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 32)},
            "down_blocks.9",
        ),
        ({"text_encoder.layer.lora_A.weight": torch.zeros(2, 4)}, "text_encoder.layer"),
        ({"conv_in.lora_A.weight": torch.zeros(2, 4), "conv_in.lora_B.weight": torch.zeros(4, 2)}, "conv_in"),
        ({keys[5]: torch.full_like(lora[keys[5]], float("nan"))}, keys[5].rsplit(".lora_", 1)[0]),
        ({"unrelated.tensor": torch.zeros(3)}, "unrelated.tensor"),
    ]
    before = _weights(unet)
    for change, named in cases:
        bad = {**lora, **change}
        for merge in (True, False):
            with pytest.raises(ValueError, match=re.escape(named)):
                load_lora(unet, bad, merge=merge)
            assert _same(before, _weights(unet)), change
    missing = dict(lora)
    del missing[keys[1]]
    with pytest.raises(ValueError, match="no matching"):
        load_lora(unet, missing)
    assert _same(before, _weights(unet))


@fuzz(30)
@given(data=st.data())
def test_one_corrupted_entry_is_the_one_named(unet, data):
    lora = _peft_lora(unet)
    key = data.draw(st.sampled_from(sorted(lora)))
    rows, cols = lora[key].shape
    shape = data.draw(
        st.tuples(st.integers(1, 70), st.integers(1, 70)).filter(lambda s: s != (rows, cols) and s[0] * s[1] < 5000)
    )
    before = _weights(unet)
    with pytest.raises(ValueError) as info:
        load_lora(unet, {**lora, key: torch.zeros(shape)})
    module = key.rsplit(".lora_", 1)[0]
    assert module in str(info.value)  # the key (or its partner in the same layer) is named
    assert _same(before, _weights(unet))


@pytest.fixture(scope="module")
def pickled_model(tiny_model, tmp_path_factory):
    """The tiny pipeline with .bin weights only (no safetensors), and a marker a hostile .bin would create."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("pickled") / "model"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.save_pretrained(root, safe_serialization=False)
    assert not list((root / "unet").glob("*.safetensors")) and list((root / "unet").glob("*.bin"))
    return root


def test_pickled_model_needs_allow_pickle(pickled_model, tmp_path):
    with pytest.raises(ValueError, match="allow_pickle"):
        diffinv.Editor.from_pretrained(pickled_model, device="cpu", progress=False)
    editor = diffinv.Editor.from_pretrained(pickled_model, device="cpu", progress=False, allow_pickle=True)
    assert editor.unet is not None

    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((64, 64, 3), 80, np.uint8)).save(photo)
    argv = ["edit", str(photo), "--source", "a", "--target", "b", "--model", str(pickled_model), "--steps", "2"]
    argv += ["--no-progress", "--device", "cpu", "--out", str(tmp_path / "out.png")]
    code, _, err = run_cli(argv)
    assert "--allow-pickle" in assert_one_line_error(code, err, 2)
    assert not (tmp_path / "out.png").exists()
    code, _, err = run_cli([*argv, "--allow-pickle"])
    assert code == 0, err


def test_hostile_pickled_model_never_executes(pickled_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(pickled_model, model)
    marker = tmp_path / "pwned"
    (weights,) = (model / "unet").glob("*.bin")
    torch.save({"conv_in.weight": _Payload(marker)}, weights)
    with pytest.raises(Exception):  # noqa: B017 - refused somewhere in diffusers; the point is what did not run
        diffinv.Editor.from_pretrained(model, device="cpu", progress=False, allow_pickle=True)
    assert not marker.exists()


def test_lora_through_the_editor_and_cli(tiny_model, unet, tmp_path):
    lora = _peft_lora(unet)
    torch.save(lora, tmp_path / "lora.bin")
    save_file(lora, str(tmp_path / "lora.safetensors"))
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((64, 64, 3), 80, np.uint8)).save(photo)
    argv = ["edit", str(photo), "--source", "a", "--target", "b", "--model", str(tiny_model), "--steps", "2"]
    argv += ["--no-progress", "--device", "cpu", "--out", str(tmp_path / "out.png")]
    code, _, err = run_cli([*argv, "--lora", str(tmp_path / "lora.bin")])
    assert "--allow-pickle" in assert_one_line_error(code, err, 2)
    code, _, err = run_cli([*argv, "--lora", str(tmp_path / "lora.bin"), "--allow-pickle"])
    assert code == 0, err
    code, _, err = run_cli([*argv, "--lora", str(tmp_path / "lora.safetensors")])
    assert code == 0, err
    bad = {**lora, sorted(lora)[0]: torch.zeros(2, 5)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    code, _, err = run_cli([*argv, "--lora", str(tmp_path / "bad.safetensors")])
    assert sorted(lora)[0] in assert_one_line_error(code, err, 2)
