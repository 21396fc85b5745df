"""``--control p2p`` in ``diffinv edit`` and ``diffinv bench`` end to end on tiny models, and its one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_piebench import make_dataset
from tiny import tiny_sd_pipe

from diffinv import cli
from diffinv.bench import PieBench, RunConfig
from diffinv.bench.runner import edit_keywords


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("p2p")
    tiny_sd_pipe().save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "photo.png")
    make_dataset(root / "pie", size=64)
    return root


def _edit(setup, *extra):
    argv = ["edit", str(setup / "photo.png"), "--model", str(setup / "model"), "--steps", "3", "--device", "cpu"]
    return cli.main([*argv, "--dtype", "fp32", "--no-progress", *extra])


def _pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_edit_with_p2p_writes_the_edit_and_records_the_options(setup, capsys):
    out = setup / "p2p" / "edit.png"
    prompts = ["--source", "a [cat] on a mat", "--target", "a [dog] on a mat"]
    p2p = ["--control", "p2p", "--cross-replace-steps", "0.8", "--equalizer", "dog=2"]
    rc = _edit(setup, *prompts, *p2p, "--out", str(out), "--grid")
    assert rc == 0, capsys.readouterr().err
    record = json.loads((setup / "p2p" / "edit.json").read_text())
    settings = record["settings"]
    assert settings["control"] == "p2p"
    assert settings["p2p_options"] == {
        "mode": "refine",
        "cross_replace_steps": 0.8,
        "self_replace_steps": 0.6,
        "blend_words": None,  # from the [ ] markers
        "equalizer": {"dog": 2.0},
        "blend_threshold": 0.3,
        "blend_start": 0.2,
    }
    assert "reconstruction_psnr" in record
    # each control setting took effect: no control, or other P2P settings, change the edit
    edited = _pixels(out)
    variants = {
        "none": [],
        "self": [*p2p, "--self-replace-steps", "0"],
        "replace": ["--control", "p2p", "--p2p-mode", "replace", "--cross-replace-steps", "0.8"],
        "blend": ["--control", "p2p", "--cross-replace-steps", "0.8", "--blend-words", "cat", "dog,mat"],
    }  # fmt: skip
    for name, flags in variants.items():
        path = setup / "p2p" / f"{name}.png"
        assert _edit(setup, *prompts, *flags, "--out", str(path)) == 0, capsys.readouterr().err
        assert np.abs(_pixels(path) - edited).max() > 0, name


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--cross-replace-steps", "0.5"], "--cross-replace-steps needs --control p2p"),
        (["--no-blend"], "--no-blend needs --control p2p"),
        (["--control", "p2p", "--cross-replace-steps", "1.5"], "--cross-replace-steps must be a fraction"),
        (["--control", "p2p", "--self-replace-steps", "0.6,0.2"], "START must not exceed END"),
        (["--control", "p2p", "--self-replace-steps", "a,b,c"], "--self-replace-steps"),
        (["--control", "p2p", "--equalizer", "dog=x"], "--equalizer dog needs a finite number"),
        (["--control", "p2p", "--equalizer", "2", "--equalizer", "dog=2"], "one SCALE"),
        (["--control", "p2p", "--blend-threshold", "2"], "blend_threshold must be in [0, 1]"),
        (["--control", "p2p", "--blend-words", "cat", "dog", "--no-blend"], "exclude each other"),
        (["--control", "p2p", "--blend-words", ",", "dog"], "--blend-words needs"),
        (["--control", "p2p", "--p2p-mode", "swap"], "--p2p-mode"),
        (["--control", "p2p", "--p2p-mode", "replace", "--target", "a big dog"], "same number of words"),
    ],
)
def test_bad_p2p_flags_are_one_line_errors(setup, capsys, flags, message):
    prompts = ["--source", "a cat"] + ([] if "--target" in flags else ["--target", "a dog"])
    try:
        rc = _edit(setup, *prompts, *flags, "--out", str(setup / "bad.png"))
    except SystemExit as stop:  # argparse's own choices check
        rc = stop.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and message in err, err


def test_bench_keywords_follow_pnpinversion_per_record(setup):
    records = {r.blended_words: r for r in PieBench(setup / "pie")}
    config = RunConfig(model="m", control="p2p")
    assert config.p2p_options == {
        "mode": "refine",
        "cross_replace_steps": 0.4,
        "self_replace_steps": 0.6,
        "equalizer": 2.0,
        "blend_threshold": 0.3,
        "blend_start": 0.2,
        "blend": True,
    }
    kw = edit_keywords(config, records[("cat", "dog")])
    assert kw["control"] == "p2p" and kw["blend_words"] == (("cat",), ("dog",)) and kw["equalizer"] == 2.0
    assert edit_keywords(config, records[()])["blend_words"] == ()  # no blended_word: no blend, no re-weighting
    assert edit_keywords(config, records[("spoon",)])["blend_words"] == (("",), ("spoon",))  # " spoon": target only
    off = RunConfig(model="m", control="p2p", p2p_options={"blend": False})
    assert edit_keywords(off, records[("cat", "dog")])["blend_words"] == ()
    assert edit_keywords(RunConfig(model="m"), records[("cat", "dog")]) == {}
    # a default given explicitly is the same run; another value is another run
    assert RunConfig(model="m", control="p2p", p2p_options={"cross_replace_steps": 0.4}).identity() == config.identity()
    other = RunConfig(model="m", control="p2p", p2p_options={"cross_replace_steps": [0.1, 0.5]})
    assert other.identity() != config.identity()
    assert RunConfig.from_dict(other.to_dict()).identity() == other.identity()
    for bad, message in (
        ({"control": "masactrl"}, "unknown control"),
        ({"p2p_options": {"mode": "refine"}}, "need control p2p"),
        ({"control": "p2p", "p2p_options": {"blend_words": [["a"], ["b"]]}}, "blended_word"),
        ({"control": "p2p", "p2p_options": {"equalizer": {"dog": 2}}}, "one number"),
        ({"control": "p2p", "p2p_options": {"cross": 0.4}}, "unknown p2p option"),
    ):
        with pytest.raises(ValueError, match=message):
            RunConfig(model="m", **bad)


def test_bench_with_p2p_end_to_end(setup, capsys):
    out = setup / "bench-p2p"
    argv = ["bench", "--data", str(setup / "pie"), "--model", str(setup / "model"), "--solver", "ddim"]
    argv += ["--steps", "3", "--metrics", "psnr,mse", "--device", "cpu", "--no-progress", "--ids"]
    argv += ["100000000001,200000000002,800000000004", "--out", str(out)]
    argv += ["--control", "p2p", "--cross-replace-steps", "0.5"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    stored = json.loads((out / "config.json").read_text())["config"]
    assert stored["control"] == "p2p" and stored["p2p_options"]["cross_replace_steps"] == 0.5
    assert stored["p2p_options"]["equalizer"] == 2.0 and stored["p2p_options"]["blend"] is True
    assert len(list((out / "records").glob("*.json"))) == 3
    # the same folder with another P2P setting is another run: refused in one line
    assert cli.main([*argv[:-1], "0.6"]) == 2
    assert "different configuration" in capsys.readouterr().err
    # the edit is the P2P edit: a run without the control edits differently
    plain = setup / "bench-plain"
    assert cli.main([*argv[: argv.index("--out")], "--out", str(plain)]) == 0
    for name in ("100000000001.png", "200000000002.png", "800000000004.png"):
        assert np.abs(_pixels(out / "edited" / name) - _pixels(plain / "edited" / name)).max() > 0
    assert cli.main([*argv[: argv.index("--control")], "--no-blend"]) == 2  # p2p flags without the control
    assert "need control p2p" in capsys.readouterr().err
