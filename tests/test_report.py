"""`diffinv report`: scaled means skipping nan and diverged rows, per edit type, Markdown/CSV, the figures."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PIL import Image
from test_bench_runner import FakeEditor
from test_piebench import make_dataset

from diffinv.bench import PieBench, RunConfig, run_bench
from diffinv.bench.report import SCALE, find_runs, guidance_groups, smoothing_pairs, summarize, unique_labels
from diffinv.cli import main
from diffinv.metrics import METRICS


def numpy_metrics(source, edited, mask, prompt):
    """All seven columns from cheap numpy statistics (the report does not care where they come from)."""
    a, b = np.asarray(source, np.float64) / 255, np.asarray(edited, np.float64) / 255
    keep = ~mask[:, :, None]
    mse = float(np.mean(((a - b) * keep) ** 2)) if keep.any() else math.nan
    bg = {"psnr": -10 * math.log10(mse + 1e-12), "lpips": mse * 3, "mse": mse, "ssim": 1 - mse} if keep.any() else {}
    diff = float(np.mean(np.abs(a - b)))
    return (
        {m: math.nan for m in ("psnr", "lpips", "mse", "ssim")}
        | bg
        | {
            "structure_distance": diff / 10,
            "clip_whole": 20 + len(prompt) % 7,
            "clip_edited": 18 + diff * 100,
        }
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data, _ = make_dataset(root / "pie", size=64)
    settings = {
        "ees27": {"solver": "ees27"},
        "ees27-npi": {"solver": "ees27", "smoothing": ["npi"]},
        "bdia": {"solver": "bdia"},
        "bdia-npi": {"solver": "bdia", "smoothing": ["npi"]},
        "ees25-w1": {"solver": "ees25", "guidance": 1.0},
        "ees25-w3": {"solver": "ees25", "guidance": 3.0},
        "ees25-w5": {"solver": "ees25", "guidance": 5.0},
    }
    for name, s in settings.items():
        config = RunConfig(model="fake", **s)
        factory = lambda c, d: FakeEditor(c, d)  # noqa: E731
        run_bench(config, data, root / "sweep" / name, editor_factory=factory, metrics=numpy_metrics, device="cpu")
    return root, data


def test_summary_scales_and_skips(runs):
    root, _ = runs
    loaded = {r.name: r for r in find_runs([root / "sweep"])}
    assert len(loaded) == 7
    bdia = summarize(loaded["bdia"].records)
    assert bdia["n"] == 6 and bdia["diverged"] == 1 and bdia["nan"] == 1  # the style edit has no background
    kept = [r for r in loaded["bdia"].records if not r["diverged"]]
    for m in METRICS:
        finite = [r[m] for r in kept if math.isfinite(r[m])]
        assert bdia[m] == pytest.approx(np.mean(finite) * SCALE[m])
        assert bdia[f"{m}_nan"] == len(kept) - len(finite)
    assert (SCALE["structure_distance"], SCALE["lpips"], SCALE["mse"], SCALE["ssim"]) == (1e3, 1e3, 1e4, 1e2)

    pairs = {(a.name, b.name) for a, b in smoothing_pairs(list(loaded.values()))}
    assert pairs == {("ees27", "ees27-npi"), ("bdia", "bdia-npi")}
    groups = guidance_groups(list(loaded.values()))
    assert [[r.name for r in g] for g in groups] == [["ees25-w1", "ees25-w3", "ees25-w5"]]


def test_report_command_writes_tables_and_figures(runs, tmp_path, capsys):
    root, data = runs
    out = tmp_path / "report"
    ids = PieBench(data).ids
    assert main(["report", str(root / "sweep"), "--out", str(out), "--ids", f"{ids[0]},{ids[3]}"]) == 0
    with open(out / "summary.csv", newline="") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"ees27", "ees27-npi", "bdia", "bdia-npi", "ees25-w1", "ees25-w3", "ees25-w5"}
    assert (
        rows["bdia"]["diverged"] == "1" and rows["ees27"]["diverged"] == "0" and rows["ees27-npi"]["smoothing"] == "npi"
    )
    with open(out / "summary_by_type.csv", newline="") as f:
        by_type = list(csv.DictReader(f))
    assert len(by_type) == 7 * 6 and {r["edit"] for r in by_type} >= {"random", "change style"}
    style = next(r for r in by_type if r["type"] == "9" and r["run"] == "ees27")
    assert style["psnr"] == "nan" and style["psnr_nan"] == "1" and style["clip_whole"] != "nan"
    md = (out / "report.md").read_text()
    assert "LPIPS ×10³ ↓" in md and "| ees27 | ees27 | lambda | 3.00 | none |" in md
    assert "| bdia | bdia | time | 3.00 | none |" in md and "## Per edit type" in md
    for name in ("fig4_clip_vs_lpips", "fig7_smoothing", "guidance", "grid"):
        with Image.open(out / f"{name}.png") as im:
            assert im.size[0] > 100 and im.size[1] > 100
        assert f"({name}.png)" in md

    assert main(["report", str(root / "sweep" / "ees27"), "--out", str(tmp_path / "t"), "--no-plots"]) == 0
    assert not (tmp_path / "t" / "grid.png").exists() and (tmp_path / "t" / "summary.csv").exists()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(root / "sweep"), "--out", str(tmp_path / "x"), "--ids", "999"]) == 2
    assert "not done in every run" in capsys.readouterr().err


def test_infinities_are_counted_apart_from_nans_and_recon_columns_are_reported():
    records = [
        {"editing_type_id": 0, "diverged": 0, "psnr": 20.0, "recon_psnr": 30.0, "recon_latent_rmse": 0.002},
        {"editing_type_id": 0, "diverged": 0, "psnr": math.inf, "recon_psnr": 40.0, "recon_latent_rmse": 0.004},
        {"editing_type_id": 9, "diverged": 0, "psnr": math.nan, "recon_psnr": math.inf},
        {"editing_type_id": 1, "diverged": 1, "psnr": math.nan},
    ]
    out = summarize(records)
    assert out["psnr"] == 20.0 and out["psnr_inf"] == 1 and out["psnr_nan"] == 1
    assert out["inf"] == 2 and out["nan"] == 1 and out["diverged"] == 1  # image 2 has a nan and an inf
    assert out["recon_psnr"] == 35.0 and out["recon_psnr_inf"] == 1
    assert out["recon_latent_rmse"] == pytest.approx(3.0)  # ×10³
    assert "recon_ssim" not in out  # no record has it: no column
    assert "recon_psnr" not in summarize(records[:1], columns=list(METRICS))


def test_same_named_runs_are_labelled_by_their_shortest_unique_suffix(runs, tmp_path):
    import shutil

    root, _ = runs
    for model in ("sd15", "sdxl"):
        shutil.copytree(root / "sweep" / "ees27", tmp_path / model / "ees27")
    shutil.copytree(root / "sweep" / "bdia", tmp_path / "sd15" / "bdia")
    paths = [tmp_path / "sd15" / "ees27", tmp_path / "sdxl" / "ees27", tmp_path / "sd15" / "bdia"]
    assert unique_labels(paths) == ["sd15/ees27", "sdxl/ees27", "bdia"]
    out = tmp_path / "report"
    assert main(["report", *map(str, paths), "--out", str(out), "--no-plots"]) == 0
    with open(out / "summary.csv", newline="") as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["sd15/ees27", "sdxl/ees27", "bdia"]


def test_a_figure_without_data_is_not_written_and_the_report_says_why(runs, tmp_path):
    root, _ = runs
    out = tmp_path / "one"
    assert main(["report", str(root / "sweep" / "ees27"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert not (out / "fig7_smoothing.png").exists() and not (out / "guidance.png").exists()
    assert "fig7_smoothing.png not written: no pair of runs differing only in smoothing" in md
    assert "guidance.png not written" in md and "(fig7_smoothing.png)" not in md
    assert (out / "fig4_clip_vs_lpips.png").exists() and (out / "grid.png").exists()


def test_arrow_and_label_plots_keep_every_point_inside_the_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffinv.bench.report import _fit

    fig, ax = plt.subplots()
    ax.annotate("", xy=(100.0, 50.0), xytext=(1.0, 2.0), arrowprops={"arrowstyle": "->"})  # autoscale ignores it
    xs, ys = [1.0, 100.0, 3.0], [2.0, 50.0, 2.0]
    _fit(ax, xs, ys)
    (x_lo, x_hi), (y_lo, y_hi) = ax.get_xlim(), ax.get_ylim()
    assert all(x_lo < x < x_hi for x in xs) and all(y_lo < y < y_hi for y in ys)
    _fit(ax, [5.0], [7.0])  # one point: a window around it, not a zero-width axis
    assert ax.get_xlim()[0] < 5.0 < ax.get_xlim()[1] and ax.get_ylim()[0] < 7.0 < ax.get_ylim()[1]
    plt.close(fig)


def test_the_effective_guidance_is_reported_never_blank(runs, tmp_path):
    root, _ = runs
    out = tmp_path / "g"
    assert main(["report", str(root / "sweep" / "ees27"), str(root / "sweep" / "ees27-npi"), "--out", str(out)]) == 0
    with open(out / "summary.csv", newline="") as f:
        guidance = {r["run"]: r["guidance"] for r in csv.DictReader(f)}
    assert guidance == {"ees27": "3.0", "ees27-npi": "7.5"}
