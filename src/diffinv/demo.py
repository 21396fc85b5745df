"""The offline demo: every solver inverts, reconstructs and edits toy scenes whose exact eps is known.

With ``model="digits"`` the same runs happen on the shipped trained network (:mod:`diffinv.models.digits`):
real handwritten 3s are inverted under the guided class-3 model and generated under other digits; the
shipped judge scores the edits, the "background" is the blank paper (pixels blank in the source and in
the reference edit), and every solver runs on both the lambda and the time grid.

Each source image (a sample of the source prompt of :class:`~diffinv.analytic.ToyScenes`) is inverted
under the source prompt's guided field, then generated back under the source prompt (reconstruction)
and under every other prompt (edits), all with the same guidance scale. Because the model is exact,
the measures are too: round-trip error, background PSNR outside the edit mask, the target prompt's
exact log-likelihood and the classification of the edit among the prompts (prompt alignment), the
distance to a converged reference edit (RK4 with many steps) and the largest inverted latent.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .analytic import ToyScenes
from .fields import as_eps_model
from .schedules import NoiseSchedule, make_grid
from .solve import SolverDivergence, generate, invert
from .solvers import Solver, get_solver, list_solvers, resolve_spacing

__all__ = [
    "COLUMNS",
    "EDIT_COLUMNS",
    "DemoConfig",
    "DemoResult",
    "format_table",
    "run_demo",
    "solver_spacing",
    "write_outputs",
]

# Columns of demo.csv (one row per solver) and demo_edits.csv (one row per solver and edit target).
COLUMNS = [
    "solver",
    "grid",
    "nfe_per_step",
    "exact",
    "roundtrip_rmse",
    "background_psnr",
    "align_loglik",
    "align_acc",
    "reference_rmse",
    "max_latent",
    "diverged",
]
EDIT_COLUMNS = ["solver", "target", "background_psnr", "align_loglik", "align_acc", "reference_rmse"]

PIXEL_RANGE = 2.0  # toy pixels live in about [-1, 1]
REFERENCE = "rk4"
GRIDS = ("auto", "lambda", "time")
MODELS = ("toy", "digits")
PATHS = ("vp", "flow")  # the toy scenes on SD's VP schedule or on the rectified-flow path (SD3, FLUX)
DIGIT_SOURCE = 3
DIGIT_TARGETS = (1, 5, 8)  # the digits model's edit targets (its source digit is DIGIT_SOURCE)
BLANK = -0.8  # digits pixels below this are blank paper
DIGITS_REFERENCE_STEPS = 400  # the trained model's converged reference edit (RK4 x 400)


@dataclass
class DemoConfig:
    """Settings of one demo run (the CLI options)."""

    steps: int = 50
    guidance: float = 3.0
    images: int = 4
    solvers: Sequence[str] | None = None  # None: every registered solver
    seed: int = 0
    grid: str = "auto"  # "auto" (per solver, see solver_spacing), "lambda" or "time" for all
    npi: bool = False  # negative-prompt inversion: the source prompt is the unconditional branch
    reference_steps: int = 200
    size: int = 16
    source: str = "gray box"
    model: str = "toy"  # "toy" (exact toy scenes) or "digits" (the shipped trained network)
    path: str = "vp"  # "vp" (SD's scaled-linear schedule) or "flow" (rectified flow, exact velocity model)

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        for name in ("steps", "images", "reference_steps", "size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.guidance, (int, float)) and math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.model == "digits" and self.images > 8:
            raise ValueError(f"the digits model ships 8 images per digit, asked for {self.images}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {', '.join(PATHS)}, got {self.path!r}")
        if self.path == "flow" and self.model != "toy":
            raise ValueError("--path flow runs the exact toy scenes; the digits network is trained on the VP path")
        if self.path == "flow" and self.grid == "lambda":
            raise ValueError(
                "the lambda grid is infinite at both ends of the flow path; use --spacing time (or auto) there"
            )
        if self.solvers is not None:
            if not self.solvers:
                raise ValueError("no solvers given")
            for name in self.solvers:
                get_solver(name)  # ValueError listing the known names


def solver_spacing(solver: Solver, grid: str = "auto", path: str = "vp") -> str:
    """The grid a solver runs on in the demo: ``grid``, or for ``"auto"`` the solver's reference grid
    (:func:`diffinv.solvers.resolve_spacing`: exactly reversible and DDIM-family methods on the time grid
    ``linspace(0, T, steps + 1).round()``, Runge-Kutta methods on the lambda-uniform grid of the paper).
    On the flow path every solver runs on the time grid (uniform in sigma, SD3's unshifted scheduler grid):
    the lambda grid is infinite at both ends there."""
    return "time" if path == "flow" else resolve_spacing(solver, grid)


# Couplings not invertible where alpha = 0: on the flow path they run the time grid without its first point.
NO_ALPHA_ZERO = ("edict", "belm")


def _grid_label(solver: Solver, spacing: str, path: str) -> str:
    """The demo table's grid column: ``spacing``, ``"time-1"`` for :data:`NO_ALPHA_ZERO` on the flow path."""
    return "time-1" if path == "flow" and solver.name in NO_ALPHA_ZERO else spacing


def grid_timesteps(schedule: NoiseSchedule, steps: int, spacing: str) -> Tensor:
    """Generation-order timesteps: diffusers' integer ``linspace`` grid for ``"time"``, else :func:`make_grid`."""
    if spacing == "time" and steps <= schedule.T:
        return torch.linspace(schedule.T, 0, steps + 1, dtype=torch.float64).round()
    return make_grid(schedule, steps, spacing)


@dataclass
class SolverRun:
    """One solver's row of the table and its outputs ``(images, 1 + edits, 3, H, W)`` (None if diverged)."""

    row: dict[str, Any]
    edits: list[dict[str, Any]]
    output: Tensor | None
    seconds: float = 0.0


@dataclass
class DemoResult:
    """Everything a demo run produced: settings, model, sources, the reference edit and each solver's run."""

    config: DemoConfig
    scenes: Any  # ToyScenes, or the DigitsModel for model="digits"
    targets: list[str]  # generation prompts per image: the source first (reconstruction), then the edits
    sources: Tensor  # (images, 3, H, W)
    reference: SolverRun
    runs: list[SolverRun] = field(default_factory=list)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [self.reference.row] + [r.row for r in self.runs]


class _Edit:
    """The demo's batched problem: sources repeated once per target, the two guided fields, the metrics."""

    def __init__(self, config: DemoConfig):
        self.config = config
        flow = config.path == "flow"
        schedule = NoiseSchedule.flow_matching() if flow else None
        self.scenes = ToyScenes(size=config.size, schedule=schedule)
        self.scenes.index(config.source)
        names = self.scenes.names
        self.targets = [config.source] + [p for p in names if p != config.source]
        gen = torch.Generator().manual_seed(config.seed)
        self.sources = self.scenes.sample(config.source, config.images, generator=gen)
        self.batch = self.sources.repeat_interleave(len(self.targets), dim=0)
        negative = config.source if config.npi else None
        per_sample = self.targets * config.images
        prediction = "flow" if flow else "epsilon"
        inversion = self.scenes.guided(config.source, config.guidance, negative=negative, prediction=prediction)
        edit = self.scenes.guided(per_sample, config.guidance, negative=negative, prediction=prediction)
        self.inversion_field = as_eps_model(inversion, self.scenes.schedule, prediction)
        self.edit_field = as_eps_model(edit, self.scenes.schedule, prediction)
        self.reference: Tensor | None = None  # the reference run's output, set by measure("reference", ...)

    def solve(self, solver: Solver, spacing: str, steps: int) -> tuple[Tensor, float]:
        """Invert the batch and generate it under the per-sample targets; returns output and max |latent|."""
        ts = grid_timesteps(self.scenes.schedule, steps, spacing)
        if _grid_label(solver, spacing, self.config.path) == "time-1":
            ts = ts[1:]  # sigma = 1 - 1/steps: EDICT and O-BELM cannot step through alpha = 0
        inv = invert(self.inversion_field, self.batch, self.scenes.schedule, solver=solver, timesteps=ts)
        peak = max(v.abs().max().item() for v in inv.state.tensors().values())
        out = generate(self.edit_field, inv)
        shape = (self.config.images, len(self.targets), *self.scenes.shape)
        return out.reshape(shape), peak

    def measure(self, name: str, solver: Solver, spacing: str, steps: int) -> SolverRun:
        row: dict[str, Any] = {
            "solver": name,
            "grid": _grid_label(solver, spacing, self.config.path),
            "nfe_per_step": solver.nfe_per_step,
            "exact": bool(solver.exact),
        }
        nan = float("nan")
        start = time.perf_counter()
        try:
            out, peak = self.solve(solver, spacing, steps)
            diverged = not bool(torch.isfinite(out).all())
        except SolverDivergence:
            out, peak, diverged = None, nan, True
        seconds = time.perf_counter() - start
        if name == "reference" and out is not None and not diverged:
            self.reference = out
        if diverged or out is None:
            row.update(dict.fromkeys(COLUMNS[4:], nan), max_latent=peak, diverged=True)
            return SolverRun(row, [], None, seconds)
        edits = [self._edit_metrics(name, out, j) for j in range(1, len(self.targets))]
        ref = self.reference
        with_bg = [e["background_psnr"] for e in edits if not math.isnan(e["background_psnr"])]
        row.update(
            roundtrip_rmse=_rmse(out[:, 0], self.sources),
            background_psnr=sum(with_bg) / len(with_bg) if with_bg else nan,
            align_loglik=sum(e["align_loglik"] for e in edits) / len(edits),
            align_acc=sum(e["align_acc"] for e in edits) / len(edits),
            reference_rmse=_rmse(out[:, 1:], ref[:, 1:]),
            max_latent=peak,
            diverged=False,
        )
        return SolverRun(row, edits, out, seconds)

    def _edit_metrics(self, name: str, out: Tensor, j: int) -> dict[str, Any]:
        """Metrics of edit ``j`` (target ``targets[j]``) averaged over the images."""
        target, scenes = self.targets[j], self.scenes
        edit = out[:, j]
        background = 1 - scenes.edit_mask(self.config.source, target)
        psnr = float("nan")
        if background.sum() > 0:
            mse = ((edit - self.sources) ** 2 * background).sum((1, 2, 3)) / (3 * background.sum())
            psnr = (10 * torch.log10(PIXEL_RANGE**2 / mse.clamp_min(1e-30))).mean().item()
        dims = edit[0].numel()
        loglik = (scenes.log_likelihood(edit, target) / dims).mean().item()
        acc = (scenes.log_likelihoods(edit).argmax(-1) == scenes.index(target)).double().mean().item()
        ref = self.reference[:, j]
        return {
            "solver": name,
            "target": target,
            "background_psnr": psnr,
            "align_loglik": loglik,
            "align_acc": acc,
            "reference_rmse": _rmse(edit, ref),
        }


class _DigitsEdit(_Edit):
    """The demo's problem on the trained digits network: real 3s edited to other digits, judged by a classifier."""

    def __init__(self, config: DemoConfig):
        from .models.digits import load_digits_judge, load_digits_model

        self.config = config
        self.scenes = load_digits_model()
        self.judge = load_digits_judge()
        digits = [DIGIT_SOURCE, *DIGIT_TARGETS]
        self.targets = [f"digit {d}" for d in digits]
        self.sources = self.scenes.sources(DIGIT_SOURCE, config.images)
        self.batch = self.sources.repeat_interleave(len(digits), dim=0)
        negative = DIGIT_SOURCE if config.npi else None
        self.inversion_field = self.scenes.eps(DIGIT_SOURCE, config.guidance, negative=negative)
        self.edit_field = self.scenes.eps(digits * config.images, config.guidance, negative=negative)
        self.reference = None

    def _edit_metrics(self, name: str, out: Tensor, j: int) -> dict[str, Any]:
        edit, ref, target = out[:, j], self.reference[:, j], DIGIT_TARGETS[j - 1]
        background = ((self.sources < BLANK) & (ref < BLANK)).to(edit.dtype)
        mse = ((edit - self.sources) ** 2 * background).sum((1, 2, 3)) / background.sum((1, 2, 3)).clamp_min(1)
        logp = torch.log_softmax(self.judge.logits(edit.clamp(-1, 1)).double(), -1)
        return {
            "solver": name,
            "target": self.targets[j],
            "background_psnr": (10 * torch.log10(PIXEL_RANGE**2 / mse.clamp_min(1e-30))).mean().item(),
            "align_loglik": logp[:, target].mean().item(),
            "align_acc": (logp.argmax(-1) == target).double().mean().item(),
            "reference_rmse": _rmse(edit, ref),
        }


def _rmse(a: Tensor, b: Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


def run_demo(config: DemoConfig | None = None, progress: bool = True) -> DemoResult:
    """Run the demo: the reference edit, then every solver (``config.solvers`` or all registered).

    Runs on one CPU thread (restored afterwards): the toy tensors are tiny, and several threads
    only wait on each other, more than 10x slower on a busy 2-core machine.
    """
    config = DemoConfig() if config is None else config
    config.check()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(config, progress)
    finally:
        torch.set_num_threads(threads)


def _run(config: DemoConfig, progress: bool) -> DemoResult:
    flow = NoiseSchedule.flow_matching() if config.path == "flow" else NoiseSchedule.scaled_linear()
    names = list(config.solvers) if config.solvers is not None else list_solvers(flow)
    problem = _DigitsEdit(config) if config.model == "digits" else _Edit(config)
    both = config.model == "digits" and config.grid == "auto"  # the trained model: every solver on both grids
    total = len(names) * (2 if both else 1) + 1
    with tqdm(total=total, desc="demo", file=sys.stderr, leave=False, disable=not progress) as bar:
        bar.set_postfix_str(f"reference ({REFERENCE}, {config.reference_steps} steps)")
        ref_spacing = "time" if config.path == "flow" else "lambda"
        reference = problem.measure("reference", get_solver(REFERENCE), ref_spacing, config.reference_steps)
        if reference.output is None:
            raise RuntimeError("the reference solve diverged; try a smaller --guidance")
        result = DemoResult(config, problem.scenes, problem.targets, problem.sources, reference)
        bar.update()
        for name in names:
            bar.set_postfix_str(name)
            solver = get_solver(name)
            for spacing in ("lambda", "time") if both else (solver_spacing(solver, config.grid, config.path),):
                result.runs.append(problem.measure(name, solver, spacing, config.steps))
                bar.update()
    return result


# -- output ---------------------------------------------------------------------------------------


def _fmt(value: Any, column: str) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if column in ("roundtrip_rmse", "reference_rmse"):
            return f"{value:.2e}"
        if column == "align_acc":
            return f"{100 * value:.0f}%"
        if column == "align_loglik":
            return f"{value:.3f}"
        return f"{value:.1f}"
    return str(value)


TABLE_HEADERS = {
    "solver": "solver",
    "grid": "grid",
    "nfe_per_step": "NFE/step",
    "exact": "exact",
    "roundtrip_rmse": "round-trip RMSE",
    "background_psnr": "bg PSNR dB",
    "align_loglik": "target loglik/dim",
    "align_acc": "target acc",
    "reference_rmse": "RMSE to ref edit",
    "max_latent": "max|latent|",
    "diverged": "diverged",
}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the per-solver rows."""
    cells = [[TABLE_HEADERS[c] for c in COLUMNS]] + [[_fmt(r[c], c) for c in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for r in rows:
            writer.writerow({c: (f"{r[c]:.6g}" if isinstance(r[c], float) else r[c]) for c in columns})


def _to_rgb(x: Tensor) -> Any:
    """``(3, H, W)`` toy (or ``(1, H, W)`` digit) pixels in [-1, 1] as an ``(H, W, 3)`` array in [0, 1] for imshow."""
    x = x.expand(3, -1, -1)
    return ((x.detach().double().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def _run_label(result: DemoResult, run: SolverRun) -> str:
    row = run.row
    if run is result.reference:
        head = f"reference\n{REFERENCE} x{result.config.reference_steps}"
    else:
        head = f"{row['solver']}\n({row['grid']} grid)"
    if row["diverged"]:
        return head
    return f"{head}\nbg {row['background_psnr']:.0f} dB, acc {100 * row['align_acc']:.0f}%"


def _plot_images(result: DemoResult, path: Path, image: int = 0) -> None:
    import matplotlib.pyplot as plt

    runs = [result.reference, *result.runs]
    cols = ["source", "reconstruction", *(f"edit to\n{t}" for t in result.targets[1:])]
    fig, axes = plt.subplots(len(runs), len(cols), figsize=(1.2 * len(cols) + 1.8, 1.25 * len(runs) + 0.9))
    axes = axes.reshape(len(runs), len(cols))
    for i, run in enumerate(runs):
        for j in range(len(cols)):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.imshow(_to_rgb(result.sources[image]), interpolation="nearest")
                ax.set_ylabel(_run_label(result, run), rotation=0, ha="right", va="center", fontsize=7)
            elif run.output is None:
                ax.set_facecolor("0.85")
                ax.text(0.5, 0.5, "diverged", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            else:
                ax.imshow(_to_rgb(run.output[image, j - 1]), interpolation="nearest")
            if i == 0:
                ax.set_title(cols[j], fontsize=7)
    c = result.config
    mode = "negative-prompt inversion" if c.npi else "full-guidance inversion"
    fig.suptitle(f"{_model_label(c)}, image {image}: w = {c.guidance:g}, {c.steps} steps, {mode}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _model_label(config: DemoConfig) -> str:
    if config.model == "digits":
        return "trained digits model"
    return "toy scenes, rectified-flow path" if config.path == "flow" else "toy scenes"


def _spread(values: list[float], gap: float) -> list[float]:
    """Label positions near ``values`` but at least ``gap`` apart (order kept)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    placed = [0.0] * len(values)
    last = -math.inf
    for i in order:
        placed[i] = max(values[i], last + gap)
        last = placed[i]
    return placed


def _plot_tradeoff(result: DemoResult, path: Path, cap: float = 120.0) -> None:
    """Background PSNR against target accuracy and against RMSE to the reference edit, one point per solver.

    PSNR above ``cap`` dB is drawn at the cap (its value is in the label), so round-off-level
    backgrounds do not squash the rest.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    runs = [r for r in [result.reference, *result.runs] if not r.row["diverged"]]
    panels = (
        ("align_acc", "prompt alignment: edits classified as the target prompt (%)", False),
        ("reference_rmse", "RMSE to the converged reference edit (log scale)", True),
    )
    for ax, (key, xlabel, logx) in zip(axes, panels):
        xs, ys, labels = [], [], []
        for run in runs:
            if logx and run is result.reference:
                continue  # its distance to itself is zero
            row = run.row
            x = 100 * row[key] if key == "align_acc" else max(row[key], 1e-12)
            y = min(row["background_psnr"], cap)
            label = row["solver"] + (f" ({row['background_psnr']:.0f} dB)" if row["background_psnr"] > cap else "")
            ref = run is result.reference
            marker, color = ("*", "k") if ref else ("s", "C3") if row["exact"] else ("o", "C0")
            ax.scatter([x], [y], marker=marker, color=color, s=110 if ref else 45, zorder=3)
            xs.append(x)
            ys.append(y)
            labels.append(label)
        if logx:
            ax.set_xscale("log")
        ax.set_ylim(min(ys) - 8, cap + 8)
        # Spread labels of points that share an x neighbourhood so that they stay readable.
        span = max(ys) - min(ys) + 16
        keys = [math.log10(x) if logx else x / 10 for x in xs]
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(round(k), []).append(i)
        for members in groups.values():
            spots = _spread([ys[i] for i in members], gap=span * 0.035)
            for i, ly in zip(members, spots):
                ax.annotate(
                    labels[i],
                    (xs[i], ys[i]),
                    xytext=(xs[i] * 1.5 if logx else xs[i] + 2.5, ly),
                    textcoords="data",
                    fontsize=7,
                    ha="left",
                    va="center",
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5},
                )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"background PSNR of the edit (dB, capped at {cap:g})")
        ax.grid(alpha=0.3)
    axes[0].set_xlim(-5, 135)
    axes[0].scatter([], [], marker="o", color="C0", label="not exactly reversible")
    axes[0].scatter([], [], marker="s", color="C3", label="exactly reversible")
    axes[0].scatter([], [], marker="*", color="k", label=f"reference ({REFERENCE} x{result.config.reference_steps})")
    axes[0].legend(fontsize=7, loc="lower left")
    c = result.config
    mode = "negative-prompt inversion" if c.npi else "full-guidance inversion"
    fig.suptitle(
        f"background preservation vs. prompt alignment ({_model_label(c)}, w = {c.guidance:g}, {c.steps} steps, "
        f"{mode}; "
        f"means over {c.images} images x {len(result.targets) - 1} edits)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: DemoResult, out: str | Path) -> list[Path]:
    """Write demo.csv, demo_edits.csv, demo.png and tradeoff.png into ``out``; returns the paths written.

    The figures need matplotlib (the ``plot`` extra); without it only the CSV files are written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "demo.csv", out / "demo_edits.csv"]
    _write_csv(written[0], COLUMNS, result.rows)
    edits = [e for run in [result.reference, *result.runs] for e in run.edits]
    _write_csv(written[1], EDIT_COLUMNS, edits)
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("note: matplotlib is not installed (pip install 'diffinv[plot]'); skipping the figures", file=sys.stderr)
        return written
    matplotlib.use("Agg")
    _plot_images(result, out / "demo.png")
    _plot_tradeoff(result, out / "tradeoff.png")
    return [*written, out / "demo.png", out / "tradeoff.png"]
