"""Input validation at every boundary: each subcommand answers bad input with one ``error:`` line and the
documented exit status (2 usage, 1 runtime), before any expensive work; the Python API raises ValueError."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fuzz
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import diffinv
from diffinv.cli import main
from diffinv.solvers import get_solver, list_solvers, solver_options

from .common import assert_one_line_error, bomb_png, run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Images of every awkward kind, and files that are not images."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    photo.save(root / "photo.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one_pixel.png")
    Image.fromarray((rng.random((40, 40)) * 65535).astype(np.uint16)).save(root / "sixteen_bit.png")
    Image.new("CMYK", (40, 30), (10, 200, 30, 5)).save(root / "cmyk.jpg")
    photo.convert("P").save(root / "palette.png")
    Image.new("RGBA", (30, 40), (1, 2, 3, 100)).save(root / "rgba.png")
    frames = [Image.new("RGB", (30, 30), (60 * i, 0, 0)) for i in range(3)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:])
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    data = (root / "photo.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "bomb.png").write_bytes(bomb_png())
    return root


@pytest.fixture(scope="module")
def broken_models(tiny_model, tmp_path_factory):
    """Model folders that must be refused: wrong pipeline class, flow-matching scheduler, pickled weights only."""
    root = tmp_path_factory.mktemp("broken")
    wrong = root / "wrong"
    shutil.copytree(tiny_model, wrong)
    index = json.loads((wrong / "model_index.json").read_text())
    (wrong / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    flow = root / "flow"
    shutil.copytree(tiny_model, flow)
    config = json.loads((flow / "scheduler" / "scheduler_config.json").read_text())
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    (flow / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    (flow / "model_index.json").write_text(
        json.dumps({**index, "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]})
    )
    return {"wrong": wrong, "flow": flow}


def _edit(image, *extra, model=None):
    argv = ["edit", str(image), "--source", "a photo", "--target", "a painting", "--steps", "2", "--no-progress"]
    return [*argv, "--device", "cpu", *([] if model is None else ["--model", str(model)]), *extra]


EDIT_USAGE = [
    ("missing.png", [], "image file not found"),
    ("empty.png", [], "cannot read image"),
    ("text.png", [], "cannot read image"),
    ("truncated.png", [], "cannot read image"),
    ("bomb.png", [], "decompression bomb"),
    (".", [], "directory"),
    ("photo.png", ["--source", "  "], "--source prompt is empty"),
    ("photo.png", ["--target", ""], "--target prompt is empty"),
    ("photo.png", ["--steps", "0"], "--steps must be >= 1"),
    ("photo.png", ["--steps", "-3"], "--steps must be >= 1"),
    ("photo.png", ["--steps", "nan"], "invalid int value"),
    ("photo.png", ["--guidance", "nan"], "--guidance must be a finite number >= 0"),
    ("photo.png", ["--guidance", "inf"], "--guidance must be a finite number >= 0"),
    ("photo.png", ["--guidance", "-1"], "--guidance must be a finite number >= 0"),
    ("photo.png", ["--inversion-guidance=-inf"], "--inversion-guidance must be a finite number"),
    ("photo.png", ["--strength", "0"], r"--strength must be in \(0, 1\]"),
    ("photo.png", ["--strength", "1.5"], r"--strength must be in \(0, 1\]"),
    ("photo.png", ["--strength", "nan"], r"--strength must be in \(0, 1\]"),
    ("photo.png", ["--solver", "rk5"], "unknown solver 'rk5'"),
    ("photo.png", ["--solver-option", "x=nan"], r"undefined at x = nan"),
    ("photo.png", ["--solver", "edict", "--solver-option", "p=5"], r"p must be in \(0, 1\]"),
    ("photo.png", ["--solver", "bdia", "--solver-option", "gamma=-1"], "gamma must be positive"),
    ("photo.png", ["--solver-option", "form=bogus"], "unknown ODE form"),
    ("photo.png", ["--solver-option", "noequals"], "KEY=VALUE"),
    ("photo.png", ["--lora-scale", "nan"], "--lora-scale must be finite"),
    ("photo.png", ["--out", "SELF"], "would overwrite the input image"),
    ("photo.png", ["--out", "edit.txt"], "unknown image suffix"),
    ("photo.png", ["--out", "photo.png/inside.png"], "output"),
    ("photo.png", ["--device", "bogus"], "unknown device 'bogus'"),
    ("photo.png", ["--spacing", "log"], "invalid choice"),
]


@pytest.mark.parametrize(
    ("image", "extra", "message"), EDIT_USAGE, ids=[f"{i}:{' '.join(e)}" for i, e, _ in EDIT_USAGE]
)
def test_edit_refuses_bad_input_before_loading_a_model(files, image, extra, message, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(diffinv.Editor, "from_pretrained", no_model)
    extra = [str(files / "photo.png") if e == "SELF" else e for e in extra]
    extra = [str(files / e) if e.startswith("photo.png/") else e for e in extra]
    code, out, err = run_cli(_edit(files / image, *extra, model=files / "no-model-needed"))
    line = assert_one_line_error(code, err, 2)
    assert __import__("re").search(message, line), line
    assert out == ""


def test_edit_refuses_an_unwritable_output_folder(files, tmp_path, monkeypatch):
    """(Root may write anywhere, so the permission answer is simulated.)"""
    import os

    import diffinv.commands.edit as edit_command

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(edit_command.os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    monkeypatch.setattr(diffinv.Editor, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    code, _, err = run_cli(_edit(files / "photo.png", "--out", str(locked / "x.png"), model=tmp_path))
    assert f"output folder {locked} is not writable" in assert_one_line_error(code, err, 2)


def test_edit_refuses_bad_models(files, tiny_model, broken_models, tmp_path):
    photo = files / "photo.png"
    cases = [
        (tmp_path / "nowhere", 2, "model folder not found"),
        (files, 2, "not a diffusers model folder"),
        (broken_models["wrong"], 2, "unsupported pipeline 'KandinskyPipeline'"),
        (broken_models["flow"], 2, "'lambda' spacing needs a finite half-log-SNR"),
    ]
    for model, status, message in cases:
        code, _, err = run_cli(_edit(photo, "--out", str(tmp_path / "x.png"), model=model))
        assert message in assert_one_line_error(code, err, status), (model, err)
    code, _, err = run_cli(_edit(photo, "--lora", str(tmp_path / "missing.safetensors"), model=tiny_model))
    assert "LoRA file not found" in assert_one_line_error(code, err, 2)
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize(
    "name", ["one_pixel.png", "sixteen_bit.png", "cmyk.jpg", "palette.png", "rgba.png", "animated.gif"]
)
def test_edit_accepts_every_kind_of_image(files, tiny_model, tmp_path, name):
    out = tmp_path / "edit.png"
    code, stdout, err = run_cli(_edit(files / name, "--out", str(out), "--resize", "pad", model=tiny_model))
    assert code == 0, err
    assert stdout.split() == [str(out), str(out.with_suffix(".json"))]  # the edit, then its sidecar
    with Image.open(out) as img:
        assert img.size == (64, 64) and img.mode == "RGB"


def test_prompts_long_and_non_ascii(files, tiny_model, tmp_path):
    """A prompt past the text encoder's 77 tokens warns naming the dropped part; non-ASCII prompts work."""

    def edit(source, target, out):
        argv = ["edit", str(files / "photo.png"), "--source", source, "--target", target, "--steps", "2"]
        return run_cli([*argv, "--model", str(tiny_model), "--out", str(out), "--no-progress", "--device", "cpu"])

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        code, _, err = edit("a photo", "a cat " + " ".join(f"w{i}" for i in range(60)) + " ENDWORD", tmp_path / "a.png")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert code == 0, err
    warned = [r.getMessage() for r in records if "truncated" in r.getMessage()]
    assert warned and "endword" in warned[0].lower() and "77" in warned[0]

    code, _, err = edit("ünïcødé 猫 🐱", "狗 — «chien»", tmp_path / "u.png")
    assert code == 0, err
    assert (tmp_path / "u.png").is_file()


DEMO_USAGE = [
    (["--steps", "0"], "steps must be a positive integer"),
    (["--steps", "-1"], "steps must be a positive integer"),
    (["--steps", "nan"], "invalid int value"),
    (["--guidance", "nan"], "guidance must be a finite number"),
    (["--guidance", "inf"], "guidance must be a finite number"),
    (["--guidance", "-5"], "guidance must be a finite number >= 0"),
    (["--images", "0"], "images must be a positive integer"),
    (["--solvers", "nope"], "unknown solver 'nope'"),
    (["--solvers", ","], "got no solver names"),
    (["--reference-steps", "0"], "reference_steps must be a positive integer"),
    (["--grid", "log"], "invalid choice"),
    (["--out", "FILE/demo"], "cannot create output folder"),
]


@pytest.mark.parametrize(("extra", "message"), DEMO_USAGE, ids=[" ".join(e) for e, _ in DEMO_USAGE])
def test_demo_refuses_bad_input_before_running(extra, message, files, monkeypatch):
    import diffinv.commands.demo as demo_command

    monkeypatch.setattr(demo_command, "run_demo", lambda *a, **k: pytest.fail("the demo ran on bad input"))
    extra = [str(files / "photo.png") + "/demo" if e == "FILE/demo" else e for e in extra]
    code, _, err = run_cli(["demo", "--no-progress", *extra])
    assert message in assert_one_line_error(code, err, 2)


def test_bench_refuses_bad_input_and_leaves_no_run_folder(pie_data, tiny_model, files, tmp_path):
    base = ["bench", "--data", str(pie_data), "--model", str(tiny_model), "--steps", "2", "--limit", "1"]
    base += ["--metrics", "psnr", "--no-progress", "--device", "cpu"]
    cases = [
        (["--guidance", "nan"], "guidance must be a finite number >= 0"),
        (["--inversion-guidance", "-2"], "inversion_guidance must be a finite number >= 0"),
        (["--steps", "0"], "steps must be a positive integer"),
        (["--solver", "nope"], "unknown solver 'nope'"),
        (["--solver-option", "x=NaN"], "undefined at x = nan"),
        (["--solver-option", "gamma=0.5"], "has no option 'gamma'"),
        (["--spacing", "log"], "unknown spacing 'log'"),
        (["--smoothing", "blur"], "unknown smoothing 'blur'"),
        (["--prompts", "odd"], "unknown prompt rule 'odd'"),
        (["--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["--metrics", "fid"], "unknown metric"),
        (["--types", "11"], "edit type must be 0-9"),
        (["--types", "x"], "--types must be integers"),
        (["--ids", "nope"], "not in mapping_file.json"),
        (["--limit", "0"], "limit must be a positive integer"),
        (["--editor-option", "strength=2"], "strength must be a finite number in [0, 1]"),
        (["--editor-option", "bogus=1"], "unknown editor option 'bogus'"),
        (["--editor-option", "lora_scale=NaN"], "lora_scale must be a finite number"),
        (["--device", "bogus"], "unknown device 'bogus'"),
        (["--device", "cuda:9"], "not available"),
        (["--model", str(tmp_path / "none")], "model folder not found"),
        (["--data", str(tmp_path)], "no mapping_file.json"),
        (["--preset", "nope"], "unknown preset"),
    ]
    for extra, message in cases:
        out = tmp_path / "run"
        code, _, err = run_cli([*base, *extra, "--out", str(out)])
        assert message in assert_one_line_error(code, err, 2), (extra, err)
        assert not out.exists(), extra  # nothing claimed: the same folder still takes a corrected run
    code, _, err = run_cli([*base, "--out", str(files / "photo.png" / "run")])
    assert "cannot create run folder" in assert_one_line_error(code, err, 2)
    code, _, err = run_cli([*base, "--out", str(tmp_path / "run")])
    assert code == 0, err


def test_report_refuses_bad_runs(tmp_path):
    for runs, message in [(tmp_path / "none", "does not exist"), (tmp_path, "holds none")]:
        code, _, err = run_cli(["report", str(runs), "--out", str(tmp_path / "rep"), "--no-plots"])
        assert message in assert_one_line_error(code, err, 2)
    run = tmp_path / "run"
    (run / "records").mkdir(parents=True)
    for stored in (b"[1", b'{"config": 3}', b"[1]", b'"x"', b"\xff\xfe"):
        (run / "config.json").write_bytes(stored)
        code, _, err = run_cli(["report", str(run), "--out", str(tmp_path / "rep"), "--no-plots"])
        assert "is not a diffinv run configuration" in assert_one_line_error(code, err, 2), stored


def test_top_level_and_list_solvers():
    code, _, err = run_cli([])
    assert code == 2 and "Traceback" not in err
    code, _, err = run_cli(["nope"])
    assert "invalid choice" in assert_one_line_error(code, err, 2)
    code, _, err = run_cli(["list-solvers", "--bogus"])
    assert "unrecognized arguments" in assert_one_line_error(code, err, 2)
    code, out, _ = run_cli(["list-solvers"])
    assert code == 0 and all(name in out for name in list_solvers())


def test_debug_shows_the_traceback(files):
    with pytest.raises(ValueError, match="image file not found"):
        main(["--debug", *_edit(files / "missing.png")])


# -- the Python API ----------------------------------------------------------------------------------

OPTION_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 5),
    st.text(max_size=6),
    st.none(),
    st.booleans(),
    st.sampled_from(["lambda-x", "t", "ees25", "euler", "noise", "data", "current", "target"]),
)


@fuzz(80)
@given(solver=st.sampled_from(list_solvers()), data=st.data())
def test_solver_options_build_or_raise_value_error(solver, data):
    names = [*sorted(solver_options(solver)), "bogus"]
    options = data.draw(st.dictionaries(st.sampled_from(names), OPTION_VALUES, max_size=2))
    defaults = solver_options(solver)
    try:
        built = get_solver(solver, **options)
    except ValueError as err:
        assert str(err)
        as_default = all(name in defaults and value == defaults[name] for name, value in options.items())
        assert not as_default, (options, err)  # the defaults (or no options) always build
        return
    for value in built.options().values():  # what was accepted is usable
        assert not (isinstance(value, float) and not math.isfinite(value))


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"steps": 2.5}, "steps must be a positive integer"),
        ({"guidance": math.nan}, "guidance must be a finite number"),
        ({"guidance": -1.0}, "guidance must be a finite number"),
        ({"inversion_guidance": math.inf}, "inversion_guidance must be a finite number"),
        ({"strength": 0.0}, "strength must be in"),
        ({"strength": 1.5}, "strength must be a finite number in"),
        ({"strength": math.nan}, "strength must be a finite number"),
        ({"solver": "rk5"}, "unknown solver"),
        ({"solver": "edict", "solver_options": {"p": 0.0}}, "p must be in"),
        ({"spacing": "log"}, "unknown spacing"),
        ({"smoothing": ["blur"]}, "unknown smoothing"),
        ({"size": (30, 64)}, "size must be positive multiples"),
        ({"resize": "zoom"}, "unknown resize mode"),
        ({"solver_dtype": torch.float16}, "solver_dtype must be"),
        ({"lora_scale": math.nan}, "lora_scale must be a finite number"),
    ],
)
def test_editor_api_rejects_bad_numbers(tiny_pipe, options, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        diffinv.Editor(tiny_pipe, device="cpu", progress=False, **options)


def test_editor_api_rejects_bad_calls(tiny_pipe, files):
    editor = diffinv.Editor(tiny_pipe, device="cpu", steps=2, progress=False)
    for image, message in [
        (files / "missing.png", "not found"),
        (files / "bomb.png", "decompression bomb"),
        ([], "at least one"),
    ]:
        with pytest.raises(ValueError, match=message):
            editor.invert(image, "a photo")
    with pytest.raises(ValueError, match="one prompt or one per image"):
        editor.invert([files / "photo.png"] * 2, ["a", "b", "c"])
    inv = editor.invert(files / "photo.png", "a photo")
    for targets, message in [([], "at least one"), ([3], "must be strings")]:
        with pytest.raises(ValueError, match=message):
            editor.edit(inv, targets)
    with pytest.raises(ValueError, match="guidance"):
        editor.edit(inv, ["a"], guidance=math.nan)
    with pytest.raises(ValueError, match=r"expected the result of Editor\.invert"):
        editor.edit("not an inversion", ["a"])
