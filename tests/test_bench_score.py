"""Bench runs that can be trusted and rescored: each solver's reference grid recorded, scored reconstructions,
metrics outside a run's identity, ``diffinv score`` (no model, resumable, safe beside another process)."""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_bench_runner import FakeEditor, fake, read_table
from test_piebench import make_dataset

from diffinv import metrics as M
from diffinv.bench import COLUMNS, PieBench, RunConfig, read_records, run_bench, score_run
from diffinv.bench.runner import _image_lock
from diffinv.cli import build_parser, main

HERE = Path(__file__).parent
TIME = ("ddim", "dpmpp_2m", "edict", "bdia", "belm", "rex", "reversible_heun", "mf")
LAMBDA = ("ees25", "ees27", "rk4", "heun")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root, _ = make_dataset(tmp_path_factory.mktemp("pie") / "pie", size=64, n=4)
    return root


def _bench(config, data, out, **kw):
    kw = {"editor_factory": fake(), "device": "cpu", "progress": False, **kw}
    return run_bench(config, data, out, **kw)


def _stored(out):
    return json.loads((out / "config.json").read_text())


def _psnr(a, b):
    """PSNR in dB of two uint8 images, whole image, data range 1 (numpy, independent of torchmetrics)."""
    mse = np.mean((np.asarray(a, np.float64) / 255 - np.asarray(b, np.float64) / 255) ** 2)
    return 10 * math.log10(1 / mse)


@pytest.mark.parametrize("solver", [*TIME, *LAMBDA])
def test_config_records_the_spacing_each_solver_used(data, tmp_path, solver):
    out = tmp_path / solver
    _bench(RunConfig(model="fake", solver=solver, metrics="mse"), data, out, limit=1)
    stored = _stored(out)
    assert stored["config"]["spacing"] == ("time" if solver in TIME else "lambda")
    assert stored["effective_guidance"] == {"guidance": 3.0, "inversion_guidance": 3.0}
    assert stored["versions"]["torch"] == importlib.metadata.version("torch")
    assert set(stored["versions"]) >= {"diffinv", "torch", "diffusers"} and "model_revision" in stored


def test_defaults_explicit_spacing_and_old_run_folders(data, tmp_path):
    args = build_parser().parse_args(["bench", "--data", "d", "--model", "m", "--out", "o"])
    from diffinv.commands.bench import RUN_DEFAULTS

    # not given: None on the command line (so a preset conflict can be told apart), "auto" in the run
    assert args.spacing is None and RUN_DEFAULTS["spacing"] == "auto" and not args.no_reconstruct
    assert RunConfig(model="m", solver="ddim", spacing="lambda").spacing == "lambda"  # explicit wins
    npi = RunConfig(model="m", smoothing=["npi"]).effective_guidance()
    assert npi == {"guidance": 7.5, "inversion_guidance": None}
    with pytest.raises(ValueError, match="editor option 'steps' is a run setting: give it as --steps"):
        RunConfig(model="m", editor_options={"steps": 10})

    # A folder written before auto spacing (ddim on the old default "lambda", guidance left null).
    out = tmp_path / "old"
    _bench(RunConfig(model="fake", solver="ddim", spacing="lambda", metrics="mse"), data, out, limit=1)
    stored = _stored(out)
    stored["config"].update(guidance=None, inversion_guidance=None)
    stored["config"].pop("reconstruct")
    (out / "config.json").write_text(json.dumps(stored))
    FakeEditor.calls.clear()
    _bench(RunConfig(model="fake", solver="ddim", spacing="lambda", guidance=3, metrics="mse"), data, out, limit=2)
    assert len(FakeEditor.calls) == 1  # same run: the default guidance is 3, an old folder reconstructed
    with pytest.raises(
        ValueError, match=r"spacing: run has 'lambda', asked 'time'; to continue this run pass --spacing lambda"
    ):
        _bench(RunConfig(model="fake", solver="ddim", metrics="mse"), data, out)


class LpipsMetrics:
    """Cheap edit metrics plus a (random-weight) LPIPS network, which the runner also uses for recon_lpips."""

    def __init__(self):
        torch.manual_seed(0)
        self.lpips = M.SqueezeLPIPS()

    def __call__(self, source, edited, mask, prompt):
        return {
            "mse": M.background_mse(source, edited, mask),
            "lpips": M.background_lpips(source, edited, mask, self.lpips),
        }


def test_reconstructions_are_scored_from_what_was_saved(data, tmp_path):
    out = tmp_path / "run"
    suite = LpipsMetrics()
    _bench(RunConfig(model="fake", solver="ees27", metrics="mse,lpips"), data, out, metrics=suite)
    rows = {r[0]: dict(zip(COLUMNS, r)) for r in read_table(out / "metrics.csv")[1:]}
    whole = np.zeros((64, 64), dtype=bool)
    for record in PieBench(data):
        row, recon = rows[record.id], Image.open(out / "recon" / f"{record.id}.png").convert("RGB")
        assert float(row["recon_psnr"]) == pytest.approx(_psnr(record.image(), recon), rel=1e-5)
        assert float(row["recon_mse"]) == pytest.approx(
            np.mean((np.asarray(record.image()) / 255 - np.asarray(recon) / 255) ** 2), rel=1e-5
        )
        a, b = (
            torch.from_numpy(np.asarray(x, np.float32) / 255).permute(2, 0, 1)[None] for x in (recon, record.image())
        )
        assert float(row["recon_ssim"]) == M.ssim_official(a, b)
        assert float(row["recon_lpips"]) == M.background_lpips(record.image(), recon, whole, suite.lpips)
        assert float(row["recon_latent_rmse"]) == pytest.approx(1 / 255)  # the fake's latent is off by 1/255
        assert 20 < float(row["recon_psnr"]) < 60  # the fake's reconstruction is the source + 1 (clipped)

    # --no-reconstruct: no reconstruction, no recon columns, recorded in the configuration.
    FakeEditor.calls.clear()
    out = tmp_path / "norecon"
    factory = lambda c, d: type("NoRecon", (FakeEditor,), {"reconstruct": None})(c, d)  # noqa: E731
    _bench(RunConfig(model="fake", solver="ees27", metrics="mse", reconstruct=False), data, out, editor_factory=factory)
    assert _stored(out)["config"]["reconstruct"] is False and not list((out / "recon").iterdir())
    rows = read_table(out / "metrics.csv")
    assert all(r[COLUMNS.index(c)] == "" for r in rows[1:] for c in ("recon_psnr", "recon_latent_rmse"))
    assert len(FakeEditor.calls) == 4
    with pytest.raises(ValueError, match="reconstruct: run has False, asked True"):
        _bench(RunConfig(model="fake", solver="ees27", metrics="mse"), data, out)


def test_more_metrics_later_score_without_editing_again(data, tmp_path):
    out = tmp_path / "run"
    _bench(RunConfig(model="fake", solver="bdia", metrics="mse"), data, out)
    assert all("psnr" not in r for r in read_records(out))
    FakeEditor.calls.clear()
    _bench(RunConfig(model="fake", solver="bdia", metrics="mse,psnr"), data, out)
    assert FakeEditor.calls == []  # nothing edited again
    records = {r["image_id"]: r for r in read_records(out)}
    for record in PieBench(data):
        row = records[record.id]
        if row["diverged"]:  # BDIA diverges on the astronaut: nothing to score
            assert math.isnan(row["psnr"]) and math.isnan(row["recon_psnr"])
            continue
        edited = Image.open(out / "edited" / f"{record.id}.png")
        expected = M.background_psnr(record.image(), edited, record.mask())
        assert row["psnr"] == expected or (math.isnan(expected) and math.isnan(row["psnr"]))
    assert sum(bool(r["diverged"]) for r in records.values()) == 1
    assert read_table(out / "metrics.csv")[1][COLUMNS.index("psnr")] != ""


class Counting:
    """Background PSNR that counts its calls and can fail after some (an interrupted scoring)."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, source, edited, mask, prompt):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls += 1
        return {"psnr": M.background_psnr(source, edited, mask)}


def test_score_resumes_and_leaves_done_work(data, tmp_path):
    out = tmp_path / "run"
    _bench(RunConfig(model="fake", solver="ees25", metrics="mse"), data, out)
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    score_run(reference, "psnr", suite=Counting(), progress=False)

    with pytest.raises(RuntimeError, match="interrupted"):
        score_run(out, "psnr", suite=Counting(fail_after=2), progress=False)
    assert sum("psnr" in r for r in read_records(out)) == 2
    resumed = Counting()
    score_run(out, "mse,psnr", suite=resumed, progress=False)
    assert resumed.calls == 2  # only the two left; mse was there already
    assert read_table(out / "metrics.csv") == read_table(reference / "metrics.csv")
    again = Counting()
    score_run(out, "psnr", suite=again, progress=False)
    assert again.calls == 0


def test_score_cli_without_the_model_folder(data, tmp_path, capsys):
    from tiny import tiny_sd_pipe

    model = tmp_path / "tiny"
    tiny_sd_pipe().save_pretrained(model)
    out = tmp_path / "run"
    argv = ["bench", "--data", str(data), "--model", str(model), "--solver", "edict", "--steps", "2", "--limit", "2"]
    assert main([*argv, "--metrics", "psnr", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    stored = _stored(out)
    assert stored["config"]["spacing"] == "time" and "folder_hash" in stored["model_revision"]
    before = {r["image_id"]: r for r in read_records(out)}
    assert all(r["recon_latent_rmse"] < 1e-3 and "ssim" not in r for r in before.values())  # EDICT is exact
    shutil.rmtree(model)
    stored["data"] = str(tmp_path / "moved")  # the data set moved: --data says where
    (out / "config.json").write_text(json.dumps(stored))
    assert main(["score", str(out), "--metrics", "psnr,ssim", "--no-progress"]) == 2
    assert "moved" in capsys.readouterr().err
    copy = tmp_path / "pie-copy"
    shutil.copytree(data, copy)
    assert main(["score", str(out), "--metrics", "psnr,ssim", "--data", str(copy), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "metrics.csv")
    for record in PieBench(data, ids=list(before)):
        row = next(r for r in read_records(out) if r["image_id"] == record.id)
        assert (
            row["psnr"] == before[record.id]["psnr"]
            and row["recon_latent_rmse"] == before[record.id]["recon_latent_rmse"]
        )
        edited = Image.open(out / "edited" / f"{record.id}.png")
        assert row["ssim"] == M.background_ssim(record.image(), edited, record.mask())
    assert main(["score", str(tmp_path), "--metrics", "psnr,ssim"]) == 0  # a folder of runs: each run in it
    assert capsys.readouterr().out.strip() == str(out / "metrics.csv")
    assert main(["score", str(model)]) == 2
    assert "is not a diffinv run folder (no config.json)" in capsys.readouterr().err
    assert main(["score", str(out), "--metrics", "fid"]) == 2
    assert "unknown metric" in capsys.readouterr().err


SCORER = """
import sys, time
sys.path.insert(0, {here!r})
from diffinv import metrics as M
from diffinv.bench import score_run
def psnr(source, edited, mask, prompt):
    with open({log!r}, "a") as f:
        f.write(edited.tobytes()[:8].hex() + "\\n")
    time.sleep(0.1)
    return {{"psnr": M.background_psnr(source, edited, mask)}}
score_run({out!r}, "psnr", suite=psnr, progress=False)
"""


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_two_scorers_on_one_run_score_each_image_once(data, tmp_path):
    out = tmp_path / "run"
    _bench(RunConfig(model="fake", solver="ddim", metrics="mse"), data, out)
    log = tmp_path / "log"
    code = SCORER.format(here=str(HERE), log=str(log), out=str(out))
    busy = PieBench(data)[1].id
    procs = []
    try:
        with _image_lock(out / "locks" / f"{busy}.lock") as mine:  # as a bench process holding that image
            assert mine
            procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
            deadline = time.time() + 120
            while not _lines(log) and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
            assert len(_lines(log)) == 1  # the first image once; both now wait for the held one
            assert all(p.poll() is None for p in procs)
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert len(_lines(log)) == 4  # four images, each scored by one process only
    assert all("psnr" in r for r in read_records(out))
