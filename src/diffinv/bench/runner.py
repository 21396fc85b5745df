"""Run an editor over PIE-Bench: edited images, reconstructions and the per-image metrics table.

A run folder holds::

    config.json          the run's configuration (a resumed run must match it)
    edited/<id>.png      the edit, as the editor produced it
    recon/<id>.png       the reconstruction (invert, then generate with the source prompt)
    records/<id>.json    one image's metrics, written last and atomically: it marks the image done
                         (a file that is not a complete record of <id> does not: it is redone)
    locks/<id>.lock      per-image advisory locks (fcntl), so concurrent processes never work on one image
                         (and locks/metrics.lock, so that they rewrite the table one at a time)
    metrics.csv          every record, one row per image, rebuilt from records/

Every file is written to a hidden ``.<name>.<pid>.tmp`` and renamed into place. Resuming: images whose record
exists are skipped; a crash between the PNGs and the record only redoes that image, and the temporary files
a killed writer left are deleted when the image (or the table) is next written, under its lock.

Several processes (``accelerate launch -m diffinv bench ...``, or ``torchrun``) each take the
selected images ``rank::world_size``; the main process writes ``metrics.csv`` once all are done. Metrics
compare the edit with the data set's image at the data set's resolution, as the official evaluation does
(:func:`diffinv.metrics.align_edit`: an edit of another size, e.g. SDXL's 1024², is refused).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import inspect
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from ..devices import check_device
from ..metrics import METRICS, MetricSuite, align_edit, parse_metrics
from ..smoothing import parse_smoothing
from ..solve import SolverDivergence
from ..solvers import get_solver, resolve_spacing
from .piebench import PieBench, PieRecord
from .presets import PROMPT_RULES, prompt_pairs

__all__ = [
    "COLUMNS",
    "EditorLike",
    "RunConfig",
    "load_editor",
    "read_records",
    "run_bench",
    "write_table",
]

COLUMNS = ("image_id", "editing_type_id", *METRICS, "diverged")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
CONFIG_FILE = "config.json"
TABLE_FILE = "metrics.csv"


class EditorLike(Protocol):
    """What the runner needs from an editor (``diffinv.Editor`` has it)."""

    def invert(self, image: Image.Image, prompt: str) -> Any: ...
    def edit(self, inversion: Any, targets: list[str]) -> list[Image.Image]: ...
    def reconstruct(self, inversion: Any) -> Any: ...


@dataclass
class RunConfig:
    """Everything that decides a run's numbers; stored in ``config.json`` and checked on resume."""

    model: str
    solver: str = "ees27"
    solver_options: dict[str, Any] = field(default_factory=dict)
    steps: int = 50
    spacing: str = "auto"  # resolved in __post_init__: config.json records the grid actually used
    guidance: float | None = None  # None: the editor's default
    inversion_guidance: float | None = None
    smoothing: list[str] = field(default_factory=list)
    editor_options: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"  # fp16 on CUDA, fp32 elsewhere
    seed: int = 1234  # the official scripts' per-image seed
    prompts: str = "standard"
    metrics: list[str] = field(default_factory=lambda: list(METRICS))

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("give a model (hub id or local folder)")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of auto, {', '.join(DTYPES)}")
        if self.prompts not in PROMPT_RULES:
            raise ValueError(f"unknown prompt rule {self.prompts!r}; choose one of {', '.join(PROMPT_RULES)}")
        for name in ("guidance", "inversion_guidance"):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
            if value is not None and not ok:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        solver = get_solver(self.solver, **(self.solver_options or {}))  # unknown solver or bad option: ValueError
        self.spacing = resolve_spacing(solver, self.spacing)  # "auto": the solver's reference grid
        parse_smoothing(self.smoothing)
        self.metrics = list(parse_metrics(self.metrics))
        self.smoothing = list(self.smoothing or [])
        self.solver_options = dict(self.solver_options or {})
        self.editor_options = dict(self.editor_options or {})

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # plain JSON types (tuples -> lists)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def load_editor(config: RunConfig, device: torch.device) -> EditorLike:
    """The default editor factory: ``diffinv.Editor.from_pretrained`` with the run's settings."""
    from ..editor import Editor

    accepted = set(inspect.signature(Editor.__init__).parameters) - {"self", "pipe", "device", "dtype"}
    unknown = sorted(set(config.editor_options) - accepted)
    if unknown:
        raise ValueError(f"unknown editor option {unknown[0]!r}; accepted: {', '.join(sorted(accepted))}")
    options: dict[str, Any] = {
        "solver": config.solver,
        "solver_options": config.solver_options or None,
        "steps": config.steps,
        "spacing": config.spacing,
        "smoothing": config.smoothing,
        "progress": False,
        **config.editor_options,
    }
    if config.guidance is not None:
        options["guidance"] = config.guidance
    if config.inversion_guidance is not None:
        options["inversion_guidance"] = config.inversion_guidance
    return Editor.from_pretrained(config.model, dtype=DTYPES[config.dtype], device=device, **options)


# -- files -------------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_leftovers(path: Path) -> None:
    """Delete the temporary files that killed writers of ``path`` left behind (see :func:`_atomic_write`).

    Call it only where no live process can be writing ``path``: under the lock that guards it.
    """
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        tmp.unlink(missing_ok=True)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _claim_config(run_dir: Path, config: RunConfig, data: Path) -> None:
    """Create ``config.json``, or check that the existing one holds the same configuration."""
    wanted = config.to_dict()
    path = run_dir / CONFIG_FILE
    if not path.exists():
        from .. import __version__

        payload = {"config": wanted, "data": str(data), "diffinv_version": __version__}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True), encoding="utf-8")
        try:
            os.link(tmp, path)  # fails if another process created it first; then compare below
        except FileExistsError:
            pass
        except OSError:  # no hard links on this file system
            if not path.exists():
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    try:
        stored = RunConfig.from_dict(json.loads(path.read_text(encoding="utf-8"))["config"]).to_dict()
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a diffinv run configuration ({err}); choose another --out") from None
    diff = [k for k in wanted if stored.get(k) != wanted[k]]
    if diff:
        what = "; ".join(f"{k}: run has {stored.get(k)!r}, asked {wanted[k]!r}" for k in diff)
        raise ValueError(f"run folder {run_dir} holds a different configuration ({what}); use another --out")
    _remove_leftovers(path)  # safe once the file exists: a claim that loses its file to this finds the winner's


@contextlib.contextmanager
def _image_lock(path: Path, wait: bool = False) -> Iterator[bool]:
    """Hold an exclusive advisory lock on ``path``; yields False if another process holds it (``wait``: block)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking (run one process per folder)
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _load_record(path: Path) -> dict[str, Any] | None:
    """The record in ``path``, or None unless it is a complete record of the image its name says.

    Records are written atomically, so a partial one can only come from outside (a copy cut short, a full
    disk, a crash of the machine before the data reached the disk): such a file never counts as done.
    """
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("image_id") != path.stem:
        return None
    return record


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every finished image's record in ``run_dir``, sorted by image id (incomplete files are skipped)."""
    out = []
    for path in sorted((Path(run_dir) / "records").glob("*.json")):
        record = _load_record(path)
        if record is not None:
            out.append(record)
    return sorted(out, key=lambda r: r["image_id"])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def write_table(run_dir: str | Path) -> Path:
    """Rebuild ``metrics.csv`` from ``records/`` (atomically); returns its path."""
    run_dir = Path(run_dir)
    path = run_dir / TABLE_FILE
    # One writer at a time: otherwise a process that read fewer records could replace a newer table last.
    with _image_lock(run_dir / "locks" / "metrics.lock", wait=True):
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(COLUMNS)
        for record in read_records(run_dir):
            writer.writerow([_cell(record.get(c)) for c in COLUMNS])
        _remove_leftovers(path)
        _atomic_write(path, buf.getvalue().encode("utf-8"))
    return path


# -- processes ---------------------------------------------------------------------------------------


@dataclass
class _Process:
    rank: int
    world: int
    device: torch.device
    barrier: Callable[[], None]


def _process(device: str | None) -> _Process:
    """This process's rank, the number of processes and its device, from Accelerate's ``PartialState``."""
    check_device(device)
    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and device is not None:
        return _Process(0, 1, torch.device(device), lambda: None)
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    dev = torch.device(device) if device is not None and state.num_processes == 1 else state.device
    return _Process(state.process_index, state.num_processes, dev, state.wait_for_everyone)


# -- the run -----------------------------------------------------------------------------------------


def run_bench(
    config: RunConfig,
    data: str | Path | PieBench,
    out: str | Path,
    *,
    types: Sequence[int] | None = None,
    ids: Sequence[str] | None = None,
    limit: int | None = None,
    device: str | None = None,
    editor_factory: Callable[[RunConfig, torch.device], EditorLike] = load_editor,
    metrics: Callable[..., dict[str, float]] | None = None,
    progress: bool = True,
    weights: str | Path | None = None,
) -> Path:
    """Edit every selected image not yet done in ``out`` and write its record; returns ``metrics.csv``.

    ``editor_factory(config, device)`` builds the editor (default: :func:`load_editor`); ``metrics`` is a
    ``(source, edited, mask, prompt) -> dict`` callable (default: a :class:`MetricSuite` with pretrained
    weights for ``config.metrics``, looked up in the ``weights`` folder first). Both are built only if an image
    remains to be done.
    """
    dataset = data if isinstance(data, PieBench) else PieBench(data, types=types, ids=ids)
    if isinstance(data, PieBench) and (types is not None or ids is not None):
        dataset = PieBench(data.root, types=types, ids=ids)
    records = list(dataset)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit}")
        records = records[:limit]
    if not records:
        raise ValueError(f"no PIE-Bench record selected in {dataset.root} (check --types / --ids)")
    for record in records:
        record.mask()  # validate every selected record before any work
    prompts = prompt_pairs(dataset, config.prompts)

    proc = _process(device)
    if config.dtype == "auto":
        config = RunConfig.from_dict({**config.to_dict(), "dtype": "fp16" if proc.device.type == "cuda" else "fp32"})
    run_dir = Path(out)
    if (run_dir / CONFIG_FILE).exists():
        _claim_config(run_dir, config, dataset.root)  # a different configuration is refused before any work

    shard = [r for r in records[proc.rank :: proc.world] if _load_record(run_dir / "records" / f"{r.id}.json") is None]
    if shard:
        # Built before the folder is claimed: a configuration the editor refuses (a typo in a solver option,
        # a missing model) must not leave behind a run folder that holds it.
        editor = editor_factory(config, proc.device)
        _check_edit_size(editor, shard[0])
        suite = metrics if metrics is not None else MetricSuite(config.metrics, device=proc.device, weights=weights)
    try:
        for sub in ("edited", "recon", "records", "locks"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create run folder {run_dir}: {err.strerror or err}") from None
    _claim_config(run_dir, config, dataset.root)
    if shard:
        _run_shard(config, shard, prompts, run_dir, editor, suite, progress and proc.rank == 0, proc.world)
    proc.barrier()
    table = run_dir / TABLE_FILE
    if proc.rank == 0:
        write_table(run_dir)
    return table


def _check_edit_size(editor: EditorLike, record: PieRecord) -> None:
    """Refuse, before any work, an editor whose outputs the official evaluation would not compare."""
    size = getattr(editor, "size", None)  # (height, width) of the model input
    width, height = record.image_size()
    if size is not None and tuple(size) != (height, width):
        raise ValueError(
            f"the editor generates {size[1]}x{size[0]} images, PIE-Bench's are {width}x{height}: the official "
            f"evaluation compares same-size images only; add --editor-option size=[{height},{width}]"
        )


def _run_shard(
    config: RunConfig,
    shard: list[PieRecord],
    prompts: dict[str, tuple[str, str]],
    run_dir: Path,
    editor: EditorLike,
    suite: Callable[..., dict[str, float]],
    progress: bool,
    world: int,
) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(shard), unit="img", disable=not progress, desc=f"{run_dir.name} (rank 0 of {world})")
    try:
        for record in shard:
            done = run_dir / "records" / f"{record.id}.json"
            with _image_lock(run_dir / "locks" / f"{record.id}.lock") as mine:
                if mine and _load_record(done) is None:  # another process may have finished it meanwhile
                    for folder, suffix in (("edited", ".png"), ("recon", ".png"), ("records", ".json")):
                        _remove_leftovers(run_dir / folder / f"{record.id}{suffix}")
                    _run_one(config, record, prompts[record.id], run_dir, editor, suite)
            bar.update(1)
    finally:
        bar.close()
        if world == 1:  # keep the table current even after an interruption
            write_table(run_dir)


def _run_one(
    config: RunConfig,
    record: PieRecord,
    prompts: tuple[str, str],
    run_dir: Path,
    editor: EditorLike,
    suite: Callable[..., dict[str, float]],
) -> None:
    source_prompt, target_prompt = prompts
    torch.manual_seed(config.seed)  # per image, as the official scripts: independent of order and sharding
    image, mask = record.image(), record.mask()
    start = time.perf_counter()
    row: dict[str, Any] = {"image_id": record.id, "editing_type_id": record.edit_type}
    try:
        inversion = editor.invert(image, source_prompt)
        edited = editor.edit(inversion, [target_prompt])[0]
        recon = editor.reconstruct(inversion)
        recon = recon[0] if isinstance(recon, (list, tuple)) else recon
    except SolverDivergence as err:
        row.update({m: math.nan for m in METRICS if m in config.metrics}, diverged=1, error=str(err))
    else:
        _atomic_write(run_dir / "edited" / f"{record.id}.png", _png(edited))
        _atomic_write(run_dir / "recon" / f"{record.id}.png", _png(recon))
        values = suite(image, align_edit(edited, image.size).convert("RGB"), mask, target_prompt)
        row.update({k: float(v) for k, v in values.items()}, diverged=0)
    row.update(
        source_prompt=source_prompt,
        target_prompt=target_prompt,
        seconds=round(time.perf_counter() - start, 3),
        edited_fraction=float(np.mean(mask)),
    )
    _atomic_write(run_dir / "records" / f"{record.id}.json", json.dumps(row, indent=1).encode("utf-8"))
