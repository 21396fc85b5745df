"""Fuzzing the command line: random argv for every subcommand either works (exit 0) or fails with exit 2
(usage) or 1 (runtime) and exactly one ``error: ...`` line, never a traceback."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
from helpers import fuzz
from hypothesis import HealthCheck, event, given
from hypothesis import strategies as st
from PIL import Image

import diffinv
import diffinv.demo
from diffinv.solvers import list_solvers

from .common import assert_one_line_error, run_cli

FUZZ = fuzz(25, suppress_health_check=list(HealthCheck))
JUNK = st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=8)
NUMBERS = st.sampled_from(["0", "1", "2", "-1", "nan", "inf", "-inf", "1e9", "0.5", "x", "", "1,2"]) | JUNK
SMALL = st.sampled_from(["-1", "0", "1", "2", "nan", "x", "", "2.5"])
SOLVERS = st.sampled_from([*list_solvers(), "rk5", "", "EES27"])
OPTIONS = st.sampled_from(
    ["x=0.1", "x=nan", "p=0.9", "p=5", "gamma=0.5", "gamma=-1", "form=t", "form=bad", "coupling=1"]
)
OPTIONS |= st.sampled_from(["base=euler", "mode=data", "inversion_timestep=target", "noequals", "=3"]) | JUNK
counter = itertools.count()


def _argv(draw, flags: dict[str, st.SearchStrategy | None], always: dict[str, st.SearchStrategy]) -> list[str]:
    """Required flags from ``always``, then a random subset of ``flags`` (None: a switch), in random order."""
    chosen = [(f, always[f]) for f in always]
    chosen += draw(st.lists(st.sampled_from(sorted(flags.items(), key=str)), max_size=4))
    chosen = draw(st.permutations(chosen))
    argv = []
    for flag, values in chosen:
        argv.append(flag)
        if values is not None:
            value = draw(values)
            argv.extend(value if isinstance(value, list) else [value])
    return argv


def _check(code: int, out: str, err: str) -> None:
    event(f"exit {code}")  # see --hypothesis-show-statistics
    if code == 0:
        assert "Traceback" not in err
        return
    assert_one_line_error(code, err, (1, 2))


@pytest.fixture(scope="module")
def world(tiny_model, pie_data, tmp_path_factory):
    """A photo, a finished bench run, and the tiny pipeline loaded once (copied for each use)."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("cli-fuzz")
    photo = root / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(photo)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    run = root / "run"
    argv = ["bench", "--data", str(pie_data), "--model", str(tiny_model), "--steps", "1", "--limit", "2"]
    assert run_cli([*argv, "--metrics", "psnr,mse", "--no-progress", "--device", "cpu", "--out", str(run)])[0] == 0
    return {"root": root, "photo": photo, "pipe": pipe, "model": tiny_model, "data": pie_data, "run": run}


@pytest.fixture
def cached_model(world, monkeypatch):
    """``Editor.from_pretrained`` of the tiny model reuses its loaded pipeline (other paths load for real)."""
    real = diffinv.Editor.from_pretrained.__func__

    def from_pretrained(cls, model=None, dtype=None, device=None, variant=None, allow_pickle=False, **options):
        if str(model) != str(world["model"]):
            return real(cls, model, dtype=dtype, device=device, variant=variant, allow_pickle=allow_pickle, **options)
        from diffinv.devices import check_device

        check_device(device)
        pipe = copy.deepcopy(world["pipe"])
        if dtype is not None:
            pipe.to(dtype=dtype)
        return cls(pipe, device=device or "cpu", allow_pickle=allow_pickle, **options)

    monkeypatch.setattr(diffinv.Editor, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(diffinv.demo, "_plot_images", lambda *a: None)  # figures: slow, and not argument handling
    monkeypatch.setattr(diffinv.demo, "_plot_tradeoff", lambda *a: None)


def _fresh(world, suffix: str = "") -> str:
    return str(world["root"] / f"out{next(counter)}{suffix}")


@FUZZ
@given(data=st.data())
def test_edit_argv(world, cached_model, data):
    photo, model = str(world["photo"]), str(world["model"])
    flags = {
        "--target": st.sampled_from(["a dog", "", "狗", "x " * 50]) | JUNK,
        "--model": st.sampled_from([model, model, str(world["root"]), str(world["root"] / "none")]),
        "--solver": SOLVERS,
        "--solver-option": OPTIONS,
        "--steps": SMALL,
        "--spacing": st.sampled_from(["lambda", "time", "sigma", "log"]),
        "--strength": NUMBERS,
        "--guidance": NUMBERS,
        "--inversion-guidance": NUMBERS,
        "--negative-prompt": JUNK,
        "--smoothing": st.lists(st.sampled_from(["npi", "proximal", "blur"]), min_size=1, max_size=2),
        "--lora": st.sampled_from([str(world["root"] / "none.safetensors"), photo]),
        "--lora-scale": NUMBERS,
        "--resize": st.sampled_from(["crop", "pad", "stretch", "zoom"]),
        "--dtype": st.sampled_from(["fp32", "fp16", "bf16", "fp8"]),
        "--device": st.sampled_from(["cpu", "cpu", "bogus", "cuda:3"]),
        "--seed": NUMBERS,
        "--out": st.sampled_from([_fresh(world, ".png"), _fresh(world, ".jpg"), _fresh(world, ".txt"), photo]),
        "--grid": None,
        "--allow-pickle": None,
        "--bogus": None,
    }
    always = {
        "--source": st.sampled_from(["a photo", "a photo", "猫", ""]) | JUNK,
        "--target": st.sampled_from(["a painting", "a painting", "  "]) | JUNK,
        "--steps": st.sampled_from(["1", "2", "2", "0", "x"]),
        "--model": st.just(model),
        "--out": st.just(_fresh(world, ".png")),
        "--no-progress": None,
    }
    image = data.draw(st.sampled_from([photo, photo, photo, str(world["root"]), "missing.png"]))
    argv = ["edit", image, *_argv(data.draw, flags, always)]
    _check(*run_cli(argv))


@FUZZ
@given(data=st.data())
def test_demo_argv(world, cached_model, data):
    flags = {
        "--steps": SMALL,
        "--guidance": NUMBERS,
        "--images": SMALL,
        "--solvers": st.lists(SOLVERS, min_size=0, max_size=3).map(",".join),
        "--seed": NUMBERS,
        "--grid": st.sampled_from(["auto", "lambda", "time", "sigma"]),
        "--npi": None,
        "--reference-steps": SMALL,
        "--out": st.sampled_from([_fresh(world), str(world["photo"]) + "/demo"]),
        "--bogus": NUMBERS,
    }
    always = {
        "--steps": st.sampled_from(["1", "2", "0"]),
        "--images": st.sampled_from(["1", "0"]),
        "--reference-steps": st.sampled_from(["2", "0"]),
        "--solvers": st.lists(SOLVERS, min_size=1, max_size=2).map(",".join),
        "--out": st.just(_fresh(world)),
        "--no-progress": None,
    }
    _check(*run_cli(["demo", *_argv(data.draw, flags, always)]))


@FUZZ
@given(data=st.data())
def test_bench_argv(world, cached_model, data):
    model, pie = str(world["model"]), str(world["data"])
    flags = {
        "--data": st.sampled_from([pie, pie, str(world["root"]), str(world["photo"])]),
        "--model": st.sampled_from([model, model, str(world["root"] / "none")]),
        "--solver": SOLVERS,
        "--solver-option": OPTIONS,
        "--steps": SMALL,
        "--spacing": st.sampled_from(["lambda", "time", "log"]),
        "--guidance": NUMBERS,
        "--inversion-guidance": NUMBERS,
        "--smoothing": st.lists(st.sampled_from(["npi", "proximal", "blur"]), min_size=0, max_size=2),
        "--editor-option": st.sampled_from(["strength=0.5", "strength=2", "bogus=1", "resize=pad", "lora_scale=NaN"]),
        "--prompts": st.sampled_from(["standard", "large-deviation", "greyscale", "odd"]),
        "--dtype": st.sampled_from(["auto", "fp32", "fp64", "fp8"]),
        "--seed": NUMBERS,
        "--device": st.sampled_from(["cpu", "bogus", "cuda"]),
        "--types": st.sampled_from(["0", "1,2", "11", "x", ""]),
        "--ids": st.sampled_from(["000000000000", "nope", ""]),
        "--limit": SMALL,
        "--metrics": st.sampled_from(["psnr", "mse,ssim", "fid", "all", ""]),
        "--preset": st.sampled_from(["nope", "solver-ablation"]),
        "--only": JUNK,
        "--list-presets": None,
    }
    always = {
        "--data": st.sampled_from([pie, pie, pie, str(world["root"])]),
        "--model": st.just(model),
        "--limit": st.sampled_from(["1", "1", "0"]),
        "--steps": st.sampled_from(["1", "2", "-1"]),
        "--metrics": st.sampled_from(["psnr", "mse"]),
        "--only": st.sampled_from(["bogus-run", "x"]),  # a preset never runs its 48 runs here
        "--out": st.just(_fresh(world)),
        "--no-progress": None,
    }
    _check(*run_cli(["bench", *_argv(data.draw, flags, always)]))


@FUZZ
@given(data=st.data())
def test_report_and_list_solvers_argv(world, data):
    flags = {
        "--ids": st.sampled_from(["000000000000", "nope", ",", ""]) | JUNK,
        "--out": st.sampled_from([_fresh(world), str(world["photo"]) + "/rep"]),
        "--bogus": None,
    }
    always = {"--out": st.just(_fresh(world)), "--no-plots": None}
    runs = data.draw(
        st.lists(st.sampled_from([str(world["run"]), str(world["root"]), str(world["photo"]), "none"]), max_size=2)
    )
    _check(*run_cli(["report", *runs, *_argv(data.draw, flags, always)]))
    extra = data.draw(st.lists(st.sampled_from(["--markdown", "--bogus", "x"]) | JUNK, max_size=2))
    _check(*run_cli(["list-solvers", *extra]))
    _check(*run_cli(data.draw(st.lists(st.sampled_from(["--debug", "--version", "nope", "-h"]) | JUNK, max_size=2))))
