"""`bench --batch-size`: B images per model call give the records of B = 1; a crash inside a batch resumes
with only its unfinished images; bad sizes are one-line errors; --dry-run counts batched model calls.

The real Editor on the tiny SD pipeline in float64 (model and solver state): every op differs between batch
sizes by round-off only (~1e-15 per UNet call), which the tiny random UNet amplifies to <= ~1e-10 in 4 steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_piebench import make_dataset

from diffinv.bench import RunConfig, read_records, run_bench
from diffinv.cli import main
from diffinv.metrics import MetricSuite

pytest.importorskip("diffusers")

METRICS = ["psnr", "mse", "ssim"]
# Records are equal to these tolerances (float64): the latent round trip absolutely, the image metrics
# relatively (they are computed from the same uint8 PNGs unless a pixel rounds the other way).
LATENT_TOL = 1e-10
METRIC_RTOL = 1e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root, _ = make_dataset(tmp_path_factory.mktemp("pie") / "pie", size=64)
    return root


@pytest.fixture(scope="module")
def pipe():
    from tiny import tiny_sd_pipe

    return tiny_sd_pipe()


@pytest.fixture(scope="module")
def suite():
    return MetricSuite(METRICS, device="cpu")


class Counting:
    """The float64 Editor on the shared tiny pipeline, counting the images it inverts and its UNet calls."""

    def __init__(self, pipe):
        self.pipe, self.inverted, self.unet_calls = pipe, [], 0

    def __call__(self, config, device):
        from diffinv import Editor

        editor = Editor(
            self.pipe,
            solver=config.solver,
            solver_options=config.solver_options,
            steps=config.steps,
            spacing=config.spacing,
            smoothing=config.smoothing,
            **config.effective_guidance(),
            dtype=torch.float64,
            solver_dtype=torch.float64,
            device="cpu",
            progress=False,
        )
        invert, denoise = editor.invert, editor.family.denoise

        def counted_invert(images, prompts):
            self.inverted.extend(prompts)
            return invert(images, prompts)

        def counted_denoise(*args, **kwargs):
            self.unet_calls += 1
            return denoise(*args, **kwargs)

        editor.invert = counted_invert
        editor.family.denoise = counted_denoise
        return editor


class CrashAfter:
    """A metric suite that raises on its ``n + 1``-th image (a crash after ``n`` images were written)."""

    def __init__(self, suite, n):
        self.suite, self.n = suite, n

    def __call__(self, *args):
        if self.n == 0:
            raise RuntimeError("simulated crash")
        self.n -= 1
        return self.suite(*args)


def _run(config, data, out, pipe, suite, batch_size, **kw):
    factory = kw.pop("factory", None) or Counting(pipe)
    run_bench(config, data, out, editor_factory=factory, metrics=suite, device="cpu", progress=False,
              batch_size=batch_size, **kw)  # fmt: skip
    return factory


def _assert_same_records(got_dir, want_dir):
    got, want = read_records(got_dir), read_records(want_dir)
    assert [r["image_id"] for r in got] == [r["image_id"] for r in want] and len(got) == 6
    for a, b in zip(got, want):
        assert a["diverged"] == b["diverged"] == 0
        assert (a["source_prompt"], a["target_prompt"]) == (b["source_prompt"], b["target_prompt"])
        assert abs(a["recon_latent_rmse"] - b["recon_latent_rmse"]) <= LATENT_TOL
        for column in ("psnr", "mse", "ssim", "recon_psnr", "recon_mse", "recon_ssim"):
            x, y = a[column], b[column]
            assert (np.isnan(x) and np.isnan(y)) or x == pytest.approx(y, rel=METRIC_RTOL, abs=1e-12), column
        for folder in ("edited", "recon"):
            pa = np.asarray(Image.open(got_dir / folder / f"{a['image_id']}.png"), np.int16)
            pb = np.asarray(Image.open(want_dir / folder / f"{a['image_id']}.png"), np.int16)
            assert np.abs(pa - pb).max() <= 1, (folder, a["image_id"])


@pytest.mark.parametrize(
    "settings",
    [
        {"solver": "ddim"},
        {"solver": "edict"},
        {"solver": "ees27", "smoothing": ["npi", "proximal"]},  # per-image proximal thresholds
    ],
    ids=["ddim", "edict", "ees27-npi-proximal"],
)
def test_batched_bench_equals_unbatched(settings, data, pipe, suite, tmp_path):
    config = RunConfig(model="tiny", steps=4, metrics=METRICS, **settings)
    one = _run(config, data, tmp_path / "b1", pipe, suite, 1)
    four = _run(config, data, tmp_path / "b4", pipe, suite, 4)
    _assert_same_records(tmp_path / "b4", tmp_path / "b1")
    assert sorted(four.inverted) == sorted(one.inverted) and len(one.inverted) == 6
    # 6 images in batches of 4 and 2: a third of the UNet calls of one image at a time.
    assert one.unet_calls == 3 * four.unet_calls > 0
    stored = json.loads((tmp_path / "b4" / "config.json").read_text())["config"]
    assert "batch_size" not in stored  # not part of the run's identity
    _run(config, data, tmp_path / "b4", pipe, suite, 2)  # another batch size continues the same run
    assert len(read_records(tmp_path / "b4")) == 6


def test_crash_inside_a_batch_resumes_only_its_unfinished_images(data, pipe, suite, tmp_path):
    config = RunConfig(model="tiny", solver="bdia", steps=4, metrics=METRICS)
    _run(config, data, tmp_path / "ref", pipe, suite, 4)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(config, data, out, pipe, CrashAfter(suite, 1), 4)  # dies scoring the 2nd image of the 1st batch
    done = [r["image_id"] for r in read_records(out)]
    assert len(done) == 1 and (out / "edited" / f"{done[0]}.png").is_file()
    # The 2nd image's PNGs were written before its scoring failed; without a record it is not done.
    assert len(list((out / "edited").glob("*.png"))) == 2 and len(list((out / "records").glob("*"))) == 1
    resumed = _run(config, data, out, pipe, suite, 4)
    assert len(resumed.inverted) == 5 and done[0] not in {r for r in resumed.inverted}  # prompts of the other 5
    _assert_same_records(out, tmp_path / "ref")
    again = _run(config, data, out, pipe, suite, 4)
    assert again.inverted == [] and again.unet_calls == 0


def test_a_diverging_image_in_a_batch_is_marked_alone(data, pipe, suite, tmp_path):
    """A divergence in a batch redoes its images one by one: only the image that diverges is marked."""
    from diffinv import SolverDivergence

    class Diverging(Counting):  # the solver diverges on the astronaut, whatever batch it is in
        def __call__(self, config, device):
            editor = super().__call__(config, device)
            invert = editor.invert

            def diverging_invert(images, prompts):
                inv = invert(images, prompts)
                if any("space suit" in p for p in prompts):
                    raise SolverDivergence("ddim", 3, 741.0, float("inf"))
                return inv

            editor.invert = diverging_invert
            return editor

    config = RunConfig(model="tiny", solver="ddim", steps=4, metrics=METRICS)
    factory = Diverging(pipe)
    _run(config, data, tmp_path / "b4", pipe, suite, 4, factory=factory)
    records = {r["image_id"]: r for r in read_records(tmp_path / "b4")}
    marked = [i for i, r in records.items() if r["diverged"]]
    assert len(records) == 6 and len(marked) == 1 and "space suit" in records[marked[0]]["source_prompt"]
    assert "diverged at step 3" in records[marked[0]]["error"]
    assert not (tmp_path / "b4" / "edited" / f"{marked[0]}.png").exists()
    assert len(list((tmp_path / "b4" / "edited").glob("*.png"))) == 5
    assert len(factory.inverted) == 6 + 4  # the first batch of 4 again, one image at a time


def test_batch_size_errors_dry_run_and_help(data, tmp_path, capsys):
    base = ["bench", "--data", str(data), "--model", "m", "--out", str(tmp_path / "o")]
    for bad in ("0", "-2"):
        assert main([*base, "--batch-size", bad]) == 2
        err = capsys.readouterr().err
        assert err == f"error: --batch-size must be a positive integer, got {bad}\n"
    with pytest.raises(ValueError, match="batch size must be a positive integer, got 0"):
        run_bench(RunConfig(model="m"), data, tmp_path / "p", batch_size=0)
    for option, what in (
        (["--control", "p2p"], "--control p2p"),
        (["--inversion", "null-text"], "--inversion null-text"),
    ):
        assert main([*base, "--solver", "ddim", "--batch-size", "2", *option]) != 0
        assert capsys.readouterr().err == (
            f"error: --batch-size 2 does not combine with {what}: those edit one image at a time\n"
        )
    assert main([*base, "--solver", "ddim", "--steps", "10", "--dry-run", "--batch-size", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # 6 images in 2 batches (4 + 2) x (invert + edit + reconstruct) x 10 steps x 1 call per DDIM step.
    assert "6 of 6 images to do, 60 model calls" in lines[0]
    assert lines[-1] == "total: 1 runs, 60 model calls (each a batch of up to 8 (4 images) under guidance)"
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1)" in text[text.rindex("--batch-size B ") :].split(" --")[0]  # its help, past the usage
