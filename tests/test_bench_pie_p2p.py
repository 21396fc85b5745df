"""``diffinv bench --preset pie-p2p`` end to end on a tiny saved pipeline and the mini PIE-Bench, then ``report``."""

from __future__ import annotations

import csv
import json

import pytest
from test_piebench import make_dataset
from tiny import tiny_sd_pipe

from diffinv.bench import PRESETS, RunConfig
from diffinv.cli import main


def test_pie_p2p_rows_are_the_official_settings():
    runs = PRESETS["pie-p2p"].runs
    assert list(runs) == [
        "ddim+p2p",
        "null-text-inversion+p2p",
        "directinversion+p2p",
        "negative-prompt-inversion+p2p",
        "ees27+p2p",
        "edict+p2p",
        "bdia+p2p",
        "belm+p2p",
        "rex+p2p",
    ]
    for run in runs.values():
        config = RunConfig(model="m", **run)
        assert config.control == "p2p" and config.effective_guidance()["guidance"] == 7.5 and config.steps == 50
    assert RunConfig(model="m", **runs["ddim+p2p"]).effective_guidance()["inversion_guidance"] == 1.0
    assert {RunConfig(model="m", **r).inversion for r in runs.values()} == {"plain", "null-text", "direct"}


def test_inversion_is_checked_and_part_of_the_run_identity(tmp_path, capsys):
    with pytest.raises(ValueError, match="null-text inversion needs a one-step solver"):
        RunConfig(model="m", solver="edict", inversion="null-text")
    assert RunConfig(model="m", solver="edict", inversion="direct").inversion == "direct"
    with pytest.raises(ValueError, match="unknown inversion method"):
        RunConfig(model="m", inversion="ddim")
    with pytest.raises(ValueError, match="unknown control"):
        RunConfig(model="m", control="masactrl")
    assert RunConfig(model="m").identity() != RunConfig(model="m", inversion="null-text").identity()
    data, _ = make_dataset(tmp_path / "pie", size=64, n=1)
    argv = ["bench", "--data", str(data), "--model", "m", "--out", str(tmp_path / "o")]
    assert main([*argv, "--solver", "bdia", "--inversion", "null-text", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: null-text inversion needs a one-step solver") and len(err.splitlines()) == 1
    assert main([*argv, "--preset", "pie-p2p", "--inversion", "direct"]) == 2
    assert "--inversion conflicts with --preset pie-p2p" in capsys.readouterr().err


def test_pie_p2p_preset_end_to_end_then_report(tmp_path, capsys):
    data, _ = make_dataset(tmp_path / "pie", size=64, n=2)
    model = tmp_path / "tiny"
    tiny_sd_pipe().save_pretrained(model)
    out = tmp_path / "runs"
    argv = ["bench", "--data", str(data), "--model", str(model), "--preset", "pie-p2p", "--steps", "2"]
    argv += ["--metrics", "psnr,mse", "--device", "cpu", "--no-progress", "--out", str(out), "--limit", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    for name in PRESETS["pie-p2p"].runs:
        config = json.loads((out / name / "config.json").read_text())["config"]
        assert config["control"] == "p2p" and config["guidance"] == 7.5
        with open(out / name / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 1 and rows[0]["diverged"] == "0", (name, rows)
        assert float(rows[0]["recon_latent_rmse"]) >= 0.0
    # DirectInversion's reconstruction is its source branch: on the source latent up to float32 rounding.
    with open(out / "directinversion+p2p" / "metrics.csv", newline="") as f:
        assert float(next(csv.DictReader(f))["recon_latent_rmse"]) < 1e-4
    report = tmp_path / "report"
    assert main(["report", str(out), "--out", str(report), "--no-plots"]) == 0, capsys.readouterr().err
    with open(report / "summary.csv", newline="") as f:
        summary = {r["run"]: r for r in csv.DictReader(f)}
    assert set(summary) == set(PRESETS["pie-p2p"].runs)
    assert summary["null-text-inversion+p2p"]["inversion"] == "null-text"
    assert summary["directinversion+p2p"]["inversion"] == "direct" and summary["rex+p2p"]["control"] == "p2p"
    assert "| directinversion+p2p | ddim | time | 7.50 | none | direct | p2p |" in (report / "report.md").read_text()
