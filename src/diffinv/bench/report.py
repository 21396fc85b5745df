"""Aggregate PIE-Bench runs into the paper's tables and figures.

Tables scale the metrics as the PIE-Bench paper prints them: structure distance and LPIPS ×10³, MSE ×10⁴,
SSIM ×10², PSNR in dB, CLIP scores as they are (already ×100). Means skip diverged images (counted in
``diverged``), ``nan`` values (background metrics of images whose mask covers everything; counted in ``nan``)
and infinities (the PSNR of a background left bit-identical; counted in ``inf``). The official script would
average an ``inf`` into an infinite column mean, so a published finite PSNR had none: a mean with ``inf > 0``
is over the finite images only and says so. Reconstruction columns (``recon_*``) appear when runs have them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..metrics import METRICS
from ..metrics import summarize as summarize_column
from .piebench import EDIT_TYPES
from .runner import CONFIG_FILE, RECON_COLUMNS, read_records

__all__ = [
    "HEADERS",
    "SCALE",
    "Run",
    "find_runs",
    "guidance_groups",
    "load_run",
    "smoothing_pairs",
    "summarize",
    "unique_labels",
    "write_report",
]

SCALE = {
    "structure_distance": 1e3,
    "psnr": 1.0,
    "lpips": 1e3,
    "mse": 1e4,
    "ssim": 1e2,
    "clip_whole": 1.0,
    "clip_edited": 1.0,
    "recon_psnr": 1.0,
    "recon_mse": 1e4,
    "recon_ssim": 1e2,
    "recon_lpips": 1e3,
    "recon_latent_rmse": 1e3,
}
HEADERS = {
    "structure_distance": "Structure ×10³ ↓",
    "psnr": "PSNR ↑",
    "lpips": "LPIPS ×10³ ↓",
    "mse": "MSE ×10⁴ ↓",
    "ssim": "SSIM ×10² ↑",
    "clip_whole": "CLIP whole ↑",
    "clip_edited": "CLIP edited ↑",
    "recon_psnr": "recon PSNR ↑",
    "recon_mse": "recon MSE ×10⁴ ↓",
    "recon_ssim": "recon SSIM ×10² ↑",
    "recon_lpips": "recon LPIPS ×10³ ↓",
    "recon_latent_rmse": "recon latent RMSE ×10³ ↓",
}


@dataclass
class Run:
    """One run folder: its name, configuration and per-image records."""

    path: Path
    name: str
    config: dict[str, Any]
    data: str | None
    records: list[dict[str, Any]]
    effective_guidance: float | None = None  # what the editor used (config.json's effective_guidance)


def load_run(path: str | Path) -> Run:
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{path} is not a diffinv bench run folder (no {CONFIG_FILE})")
    try:
        stored = json.loads(config_path.read_text(encoding="utf-8"))
        config = stored["config"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{config_path} is not a diffinv run configuration ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a diffinv run configuration (config is not an object)")
    effective = stored.get("effective_guidance")
    effective = effective.get("guidance") if isinstance(effective, dict) else None
    return Run(path, path.name, config, stored.get("data"), read_records(path), effective)


def unique_labels(paths: Sequence[Path]) -> list[str]:
    """Each path's shortest suffix (``a/ees27``) that no other path in ``paths`` ends with too."""
    parts = [Path(p).resolve().parts for p in paths]
    labels = []
    for i, mine in enumerate(parts):
        for k in range(1, len(mine) + 1):
            if all(other[-k:] != mine[-k:] for j, other in enumerate(parts) if j != i):
                break
        labels.append("/".join(mine[-k:]))
    return labels


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Run folders from ``paths``; a folder without ``config.json`` stands for its run subfolders (a preset)."""
    runs = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ValueError(f"run folder {p} does not exist")
        if (p / CONFIG_FILE).is_file():
            runs.append(load_run(p))
            continue
        children = sorted(c for c in p.iterdir() if (c / CONFIG_FILE).is_file())
        if not children:
            raise ValueError(f"{p} is not a run folder and holds none (no {CONFIG_FILE})")
        runs.extend(load_run(c) for c in children)
    if not runs:
        raise ValueError("give at least one run folder")
    return runs


def _value(record: dict[str, Any], metric: str) -> float | None:
    v = record.get(metric)
    return None if v is None else float(v)


def _columns(records: Sequence[dict[str, Any]]) -> list[str]:
    """The metric columns to report: the edit metrics, then the reconstruction ones that some record has."""
    return [*METRICS, *(m for m in RECON_COLUMNS if any(r.get(m) is not None for r in records))]


def summarize(records: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> dict[str, Any]:
    """``n``, ``diverged``, ``nan`` / ``inf`` (images with any nan / infinite metric) and, per metric, its scaled
    mean over the finite values (:func:`diffinv.metrics.summarize`) with its own nan and inf counts."""
    kept = [r for r in records if not r.get("diverged")]
    out: dict[str, Any] = {"n": len(records), "diverged": len(records) - len(kept)}
    nan_rows, inf_rows = set(), set()
    for m in columns if columns is not None else _columns(records):
        values = [(i, _value(r, m)) for i, r in enumerate(kept)]
        present = [(i, v) for i, v in values if v is not None]
        column = summarize_column([v for _, v in present])
        nan_rows.update(i for i, v in present if math.isnan(v))
        inf_rows.update(i for i, v in present if math.isinf(v))
        out[m] = column["mean"] * SCALE[m]
        out[f"{m}_nan"], out[f"{m}_inf"] = column["n_nan"], column["n_inf"]
    out["nan"], out["inf"] = len(nan_rows), len(inf_rows)
    return out


def _describe(run: Run) -> dict[str, Any]:
    config = run.config
    guidance = config.get("guidance") if config.get("guidance") is not None else run.effective_guidance
    return {
        "solver": config.get("solver"),
        "options": json.dumps(config.get("solver_options") or {}, sort_keys=True),
        "steps": config.get("steps"),
        "spacing": config.get("spacing"),
        "guidance": "" if guidance is None else guidance,
        "smoothing": "+".join(config.get("smoothing") or []) or "none",
        "inversion": config.get("inversion") or "plain",
        "control": config.get("control") or "none",
        "prompts": config.get("prompts"),
        "model": config.get("model"),
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(
            {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows
        )
    return buf.getvalue()


def _markdown(rows: list[dict[str, Any]], first: Sequence[str], columns: Sequence[str]) -> str:
    cols = [*first, "n", "diverged", "nan", "inf", *columns]
    head = [HEADERS.get(c, c) for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_report(
    runs: Sequence[Run], out: str | Path, ids: Sequence[str] | None = None, plots: bool = True
) -> list[Path]:
    """Write ``summary.csv``, ``summary_by_type.csv``, ``report.md`` and the PNG figures; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for run, label in zip(runs, unique_labels([r.path for r in runs])):
        run.name = label
    columns = _columns([rec for r in runs for rec in r.records])
    overall = [{"run": r.name, **_describe(r), **summarize(r.records, columns)} for r in runs]
    by_type = []
    for r in runs:
        for t in sorted({int(rec["editing_type_id"]) for rec in r.records}):
            records = [rec for rec in r.records if int(rec["editing_type_id"]) == t]
            by_type.append({"run": r.name, "type": t, "edit": EDIT_TYPES[t], **summarize(records, columns)})
    written = [out / "summary.csv", out / "summary_by_type.csv", out / "report.md"]
    written[0].write_text(_csv(overall), encoding="utf-8")
    written[1].write_text(_csv(by_type), encoding="utf-8")
    md = [
        "# PIE-Bench results",
        "",
        "Structure distance and LPIPS ×10³, MSE ×10⁴, SSIM ×10² (as the PIE-Bench paper). Means skip diverged "
        "images (`diverged`), nan values (`nan`: images whose mask covers the whole image have no background) and "
        "infinities (`inf`: a background left bit-identical has PSNR = inf; the official script's mean would be "
        "inf, so a published finite PSNR had none: compare only rows with inf = 0). `recon *` columns score the "
        "reconstruction (source prompt) against the source image.",
        "",
        _markdown(overall, ["run", "solver", "spacing", "guidance", "smoothing", "inversion", "control"], columns),
        "",
        "## Per edit type",
        "",
        _markdown(by_type, ["run", "type", "edit"], columns),
        "",
    ]
    if plots:
        figures, skipped = _plots(runs, overall, out, ids)
        md += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""] + skipped + [""] * bool(skipped)
        written += figures
    written[2].write_text("\n".join(md), encoding="utf-8")
    return written


# -- plots ---------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plots need matplotlib (pip install 'diffinv[plot]'), or pass --no-plots") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _key_without(config: dict[str, Any], *fields: str) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in fields}, sort_keys=True)


def smoothing_pairs(runs: Sequence[Run]) -> list[tuple[Run, Run]]:
    """``(without, with)`` pairs: runs with smoothing and the run whose configuration differs only by having none."""
    base = {_key_without(r.config, "smoothing"): r for r in runs if not r.config.get("smoothing")}
    pairs = []
    for r in runs:
        start = base.get(_key_without(r.config, "smoothing"))
        if r.config.get("smoothing") and start is not None:
            pairs.append((start, r))
    return pairs


def guidance_groups(runs: Sequence[Run]) -> list[list[Run]]:
    """Groups of runs that differ only in guidance (at least two scales), each sorted by guidance."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        if r.config.get("guidance") is not None:
            groups.setdefault(_key_without(r.config, "guidance"), []).append(r)
    return [
        sorted(g, key=lambda r: r.config["guidance"])
        for g in groups.values()
        if len({r.config["guidance"] for r in g}) > 1
    ]


def _fit(ax: Any, xs: Sequence[float], ys: Sequence[float], pad: float = 0.15) -> None:
    """Axis limits holding every point (arrow ends and labelled points included, which autoscaling misses)."""
    for values, set_lim in ((xs, ax.set_xlim), (ys, ax.set_ylim)):
        low, high = min(values), max(values)
        span = (high - low) or max(abs(high), 1.0) * 0.1
        set_lim(low - pad * span, high + pad * span)


def _plots(
    runs: Sequence[Run], overall: list[dict[str, Any]], out: Path, ids: Sequence[str] | None
) -> tuple[list[Path], list[str]]:
    """The figures that have data, and one line for each that was not written saying why."""
    plt = _pyplot()
    stats = {row["run"]: row for row in overall}
    figures, skipped = [], []

    def point(run: Run) -> tuple[float, float]:
        return stats[run.name]["lpips"], stats[run.name]["clip_edited"]

    # Fig. 4: prompt alignment (CLIP edited) vs background preservation (LPIPS), one point per run.
    placed = [(r, *point(r)) for r in runs if all(math.isfinite(v) for v in point(r))]
    if placed:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r, x, y in placed:
            ax.scatter(x, y)
            ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        _fit(ax, [x for _, x, _ in placed], [y for _, _, y in placed])
        ax.set(
            xlabel=HEADERS["lpips"], ylabel=HEADERS["clip_edited"], title="Prompt alignment vs background preservation"
        )
        figures.append(_save(fig, out / "fig4_clip_vs_lpips.png", plt))
    else:
        skipped.append("fig4_clip_vs_lpips.png not written: no run has both a finite LPIPS and CLIP edited mean.")

    # Fig. 7: arrows from a run without smoothing to the same run with each smoothing strategy.
    arrows = [(a, r) for a, r in smoothing_pairs(runs) if all(math.isfinite(v) for v in (*point(a), *point(r)))]
    if arrows:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for start, r in arrows:
            (x0, y0), (x1, y1) = point(start), point(r)
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops={"arrowstyle": "->"})
            ax.scatter([x0], [y0], color="grey")
            ax.scatter([x1], [y1], color="black", s=8)
            ax.annotate(f"{start.name} → {'+'.join(r.config['smoothing'])}", (x1, y1), fontsize=8)
        ends = [p for a, r in arrows for p in (point(a), point(r))]
        _fit(ax, [x for x, _ in ends], [y for _, y in ends])
        ax.set(xlabel=HEADERS["lpips"], ylabel=HEADERS["clip_edited"], title="Effect of smoothing")
        figures.append(_save(fig, out / "fig7_smoothing.png", plt))
    else:
        skipped.append(
            "fig7_smoothing.png not written: no pair of runs differing only in smoothing (with finite LPIPS and CLIP)."
        )

    # Metric vs guidance scale, one line per group of runs that differ only in guidance.
    groups = guidance_groups(runs)
    if groups:
        fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3))
        for group in groups:
            label = group[0].config.get("solver")
            for ax, m in zip(axes, METRICS):
                xs = [r.config["guidance"] for r in group]
                ax.plot(xs, [stats[r.name][m] for r in group], marker="o", label=label)
        for ax, m in zip(axes, METRICS):
            ax.set(xlabel="guidance scale", title=HEADERS[m])
        axes[0].legend(fontsize=7)
        figures.append(_save(fig, out / "guidance.png", plt))
    else:
        skipped.append("guidance.png not written: no group of runs differing only in guidance (two scales or more).")

    figures.append(_grid(runs, out / "grid.png", ids, plt))
    return figures, skipped


def _grid(runs: Sequence[Run], path: Path, ids: Sequence[str] | None, plt) -> Path:
    """Source image and each run's edit for the chosen ids (default: the first four ids every run has)."""
    from PIL import Image

    from .piebench import PieBench

    common = sorted(set.intersection(*({rec["image_id"] for rec in r.records} for r in runs)))
    chosen = list(ids) if ids else common[:4]
    missing = [i for i in chosen if i not in common]
    if missing:
        raise ValueError(f"image id(s) {', '.join(missing)} are not done in every run")
    dataset = None
    if runs[0].data and Path(runs[0].data).is_dir():
        try:
            dataset = PieBench(runs[0].data)
        except ValueError:
            dataset = None
    cols = 1 + len(runs)
    fig, axes = plt.subplots(max(1, len(chosen)), cols, figsize=(2 * cols, 2 * max(1, len(chosen))), squeeze=False)
    for row, image_id in enumerate(chosen):
        panels = [("source", dataset.by_id(image_id).image() if dataset else None)]
        for r in runs:
            png = r.path / "edited" / f"{image_id}.png"
            panels.append((r.name, Image.open(png) if png.is_file() else None))
        for col, (title, image) in enumerate(panels):
            ax = axes[row][col]
            ax.axis("off")
            if image is not None:
                ax.imshow(image)
            else:
                ax.text(0.5, 0.5, "diverged" if col else "no source", ha="center", va="center")
            if row == 0:
                ax.set_title(title, fontsize=8)
        axes[row][0].text(
            -0.05, 0.5, image_id, transform=axes[row][0].transAxes, rotation=90, va="center", ha="right", fontsize=7
        )
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
