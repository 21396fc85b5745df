"""Run an editor over PIE-Bench: edited images, reconstructions and the per-image metrics table.

A run folder holds::

    config.json          the run's configuration (a resumed run must match it, except its metrics), the data
                         set's path, the package versions and the model's revision (informational)
    edited/<id>.png      the edit, as the editor produced it
    recon/<id>.png       the reconstruction (invert, then generate with the source prompt; not with
                         ``reconstruct=False``)
    records/<id>.json    one image's metrics, written last and atomically: it marks the image done
                         (a file that is not a complete record of <id> does not: it is redone)
    locks/<id>.lock      per-image advisory locks (fcntl), so concurrent processes never work on one image
                         (and locks/metrics.lock, so that they rewrite the table one at a time)
    metrics.csv          every record, one row per image, rebuilt from records/

Every file is written to a hidden ``.<name>.<pid>.tmp`` and renamed into place. Resuming: images whose record
exists are skipped; a crash between the PNGs and the record only redoes that image, and the temporary files
a killed writer left are deleted when the image (or the table) is next written, under its lock.

Metrics are not part of a run's identity: a done image whose record lacks an asked metric is scored from its
saved PNGs (:func:`score_run`, ``diffinv score``; ``run_bench`` with other metrics does the same), never
re-edited. Only ``recon_latent_rmse`` needs the model, so it is computed at edit time only.

Several processes (``accelerate launch -m diffinv bench ...``, or ``torchrun``) each take the
selected images ``rank::world_size``; the main process writes ``metrics.csv`` once all are done. Metrics
compare the edit with the data set's image at the data set's resolution, as the official evaluation does
(:func:`diffinv.metrics.align_edit`: an edit of another size, e.g. SDXL's 1024², is refused).
"""

from __future__ import annotations

import contextlib
import csv
import functools
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
from ..inversions import check_method
from ..metrics import METRICS, RECON_METRICS, MetricSuite, align_edit, parse_metrics, reconstruction_metrics
from ..smoothing import parse_smoothing
from ..solve import SolverDivergence
from ..solvers import SPACING_CHOICES, get_solver, resolve_spacing
from .piebench import PieBench, PieRecord
from .presets import PROMPT_RULES, prompt_pairs

__all__ = [
    "COLUMNS",
    "RECON_COLUMNS",
    "EditorLike",
    "RunConfig",
    "check_batch_size",
    "image_batches",
    "load_editor",
    "read_records",
    "read_run",
    "run_bench",
    "score_run",
    "select_records",
    "write_table",
]

RECON_COLUMNS = (*RECON_METRICS, "recon_latent_rmse")
COLUMNS = ("image_id", "editing_type_id", *METRICS, *RECON_COLUMNS, "diverged")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
CONFIG_FILE = "config.json"
TABLE_FILE = "metrics.csv"


class EditorLike(Protocol):
    """What the runner needs from an editor (``diffinv.Editor`` has it).

    The runner passes a batch of images (one at ``batch_size`` 1), each with its own prompts:
    ``invert(images, source_prompts)``; ``edit(inversion, [[target] for each image])`` returns one edit per
    image. ``invert``'s result has ``source``, the encoded source latents (one row per image);
    ``reconstruct(inv, output_type="latent")`` returns the regenerated latents, which ``decode_latents`` turns
    into images (``recon_latent_rmse`` compares the two latents, row by row).
    """

    def invert(self, images: list[Image.Image], prompts: list[str]) -> Any: ...
    def edit(self, inversion: Any, targets: list[list[str]]) -> list[Image.Image]: ...
    def reconstruct(self, inversion: Any, output_type: str = "pil") -> Any: ...
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]: ...


@dataclass
class RunConfig:
    """Everything that decides a run's numbers; stored in ``config.json`` and checked on resume.

    ``spacing="auto"`` is resolved here to the solver's reference grid (:func:`diffinv.solvers.resolve_spacing`),
    so the stored configuration says which grid was used. ``guidance=None``: the editor's default, which
    :meth:`effective_guidance` resolves (and ``config.json`` records). ``metrics`` are the ones to compute, not
    part of the run's identity (see :func:`score_run`).
    """

    model: str
    solver: str = "ees27"
    solver_options: dict[str, Any] = field(default_factory=dict)
    steps: int = 50
    spacing: str = "auto"
    guidance: float | None = None
    inversion_guidance: float | None = None
    smoothing: list[str] = field(default_factory=list)
    inversion: str = "plain"  # or "null-text" / "direct" (diffinv.inversions)
    editor_options: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"  # fp16 on CUDA (bf16 for FLUX), fp32 elsewhere
    seed: int = 1234  # the official scripts' per-image seed
    prompts: str = "standard"
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    reconstruct: bool = True  # also reconstruct each image (a third of the cost) and score the reconstruction
    control: str | None = None  # "p2p": Prompt-to-Prompt (diffinv.controls.p2p)
    p2p_options: dict[str, Any] = field(default_factory=dict)  # resolved to every option by __post_init__

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
        if self.spacing not in SPACING_CHOICES:
            raise ValueError(f"unknown spacing {self.spacing!r}; choose one of {', '.join(SPACING_CHOICES)}")
        if not isinstance(self.reconstruct, bool):
            raise ValueError(f"reconstruct must be true or false, got {self.reconstruct!r}")
        solver = get_solver(self.solver, **(self.solver_options or {}))  # unknown solver or bad option: ValueError
        self.spacing = resolve_spacing(solver, self.spacing)
        check_method(self.inversion, solver, parse_smoothing(self.smoothing))
        self.metrics = list(parse_metrics(self.metrics))
        self.smoothing = list(self.smoothing or [])
        self.solver_options = dict(self.solver_options or {})
        self.editor_options = dict(self.editor_options or {})
        self.p2p_options = _p2p_options(self.control, self.p2p_options)
        taken = sorted(set(self.editor_options) & RUN_SETTINGS)
        if taken:
            flag = taken[0].replace("_", "-")
            raise ValueError(f"editor option {taken[0]!r} is a run setting: give it as --{flag} instead")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # plain JSON types (tuples -> lists)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def effective_guidance(self) -> dict[str, float | None]:
        """The guidance scales the editor uses: ``guidance`` (default 3, or 7.5 with NPI) and
        ``inversion_guidance`` (default: the guidance; ``None`` under NPI, which inverts without guidance)."""
        from ..editor import DEFAULT_GUIDANCE, DEFAULT_NPI_GUIDANCE

        npi = "npi" in parse_smoothing(self.smoothing)
        guidance = self.guidance
        if guidance is None:
            guidance = DEFAULT_NPI_GUIDANCE if npi else DEFAULT_GUIDANCE
        inversion = self.inversion_guidance
        if inversion is None and not npi:
            inversion = guidance
        return {"guidance": float(guidance), "inversion_guidance": None if inversion is None else float(inversion)}

    def identity(self) -> dict[str, Any]:
        """The settings a run folder's results depend on: all but ``metrics`` (computed later if missing), with
        the effective guidance (a default and the same scale given explicitly are one run)."""
        return {k: v for k, v in self.to_dict().items() if k != "metrics"} | self.effective_guidance()


# Editor keywords that are RunConfig fields: an editor option may not set them behind the run's back.
RUN_SETTINGS = {"solver", "solver_options", "steps", "spacing", "guidance", "inversion_guidance", "smoothing"}
# PnPInversion's run_editing_p2p.py: blend on each record's blended_word (source word, target word), the target
# word's cross-attention weighted 2; records without one get neither.
PIEBENCH_P2P = {"blend": True, "equalizer": 2.0}


def _p2p_options(control: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """Every P2P option of a run (P2POptions' defaults, then PIE-Bench's, then the given ones), so that a default
    and the same value given explicitly are one run; ``{}`` without the control."""
    from dataclasses import asdict

    from ..controls import P2POptions

    options = dict(options or {})
    if control not in (None, "p2p"):
        raise ValueError(f"unknown control {control!r}; choose p2p or none")
    if control is None:
        if options:
            raise ValueError(f"p2p options {', '.join(sorted(options))} need control p2p")
        return {}
    if "blend_words" in options:
        raise ValueError("blend_words come from each PIE-Bench record's blended_word; give blend=false for none")
    blend = options.pop("blend", PIEBENCH_P2P["blend"])
    if not isinstance(blend, bool):
        raise ValueError(f"p2p option blend must be true or false, got {blend!r}")
    eq = options.get("equalizer", PIEBENCH_P2P["equalizer"])
    if isinstance(eq, dict):
        raise ValueError("p2p option equalizer in bench is one number for each record's target blend word")
    resolved = asdict(P2POptions.from_dict({**options, "equalizer": eq}))
    del resolved["blend_words"]
    return json.loads(json.dumps({**resolved, "blend": blend}))


def edit_keywords(config: RunConfig, record: PieRecord) -> dict[str, Any]:
    """The ``Editor.edit`` keywords of a run's control for one record (none without a control)."""
    if config.control is None:
        return {}
    options = {k: v for k, v in config.p2p_options.items() if k != "blend"}
    raw = record.raw.get("blended_word", "")
    words = raw.split(" ") if raw else []  # as run_editing_p2p.py: " spoon" is ("", "spoon"), a target word only
    blend = config.p2p_options["blend"] and len(words) >= 2
    options["blend_words"] = ((words[0],), (words[1],)) if blend else ()
    return {"control": config.control, **options}


def _auto_dtype(model: str, device: torch.device) -> str:
    """``dtype="auto"``: fp32 off CUDA; on CUDA the model family's dtype (fp16; bf16 for FLUX)."""
    if device.type != "cuda":
        return "fp32"
    from ..families import family_for_model

    try:
        wanted = family_for_model(model).cuda_dtype
    except ValueError:  # not a model folder this process can read: the editor factory decides
        return "fp16"
    return next(name for name, dtype in DTYPES.items() if dtype == wanted)


def load_editor(config: RunConfig, device: torch.device, runtime: dict[str, Any] | None = None) -> EditorLike:
    """The default editor factory: ``diffinv.Editor.from_pretrained`` with the run's settings.

    ``runtime``: the memory and speed options (offload, vae_tiling, vae_slicing, compile; :mod:`diffinv.runtime`).
    They change how fast the run goes, not its results, so they are not part of the run's identity.
    """
    from ..editor import Editor

    accepted = set(inspect.signature(Editor.__init__).parameters) - {"self", "pipe", "device", "dtype"}
    unknown = sorted(set(config.editor_options) - accepted)
    if unknown:
        raise ValueError(f"unknown editor option {unknown[0]!r}; accepted: {', '.join(sorted(accepted))}")
    options: dict[str, Any] = {
        "progress": False,
        **config.editor_options,
        "solver": config.solver,
        "solver_options": config.solver_options or None,
        "steps": config.steps,
        "spacing": config.spacing,
        "smoothing": config.smoothing,
        **config.effective_guidance(),  # what config.json records
        **(runtime or {}),
    }
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
    """Create ``config.json``, or check that the existing one holds the same configuration (but for metrics)."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        from .. import __version__
        from ..provenance import model_revision, versions

        payload = {
            "config": config.to_dict(),
            "effective_guidance": config.effective_guidance(),  # never null: what the editor uses
            "data": str(Path(data).resolve()),
            "diffinv_version": __version__,
            "versions": versions(),  # informational, like the model's revision: not checked on resume
            "model_revision": model_revision(config.model),
        }
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
    stored = read_run(run_dir)[0].identity()  # resolved as a new one is: a stored "auto" or null guidance matches
    wanted = config.identity()
    diff = [k for k in wanted if stored.get(k) != wanted[k]]
    if diff:
        what = "; ".join(f"{k}: run has {stored.get(k)!r}, asked {wanted[k]!r}" for k in diff)
        if "spacing" in diff:
            what += f"; to continue this run pass --spacing {stored['spacing']} (the default, auto, may differ)"
        raise ValueError(f"run folder {run_dir} holds a different configuration ({what}); use another --out")
    _remove_leftovers(path)  # safe once the file exists: a claim that loses its file to this finds the winner's


def read_run(run_dir: str | Path) -> tuple[RunConfig, Path]:
    """A run folder's configuration and the data set path it was run on (from its ``config.json``)."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        return RunConfig.from_dict(stored["config"]), Path(stored["data"])
    except FileNotFoundError:
        raise ValueError(f"{run_dir} is not a diffinv run folder (no {CONFIG_FILE})") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a diffinv run configuration ({err})") from None


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


def select_records(
    data: str | Path | PieBench,
    types: Sequence[int] | None = None,
    ids: Sequence[str] | None = None,
    limit: int | None = None,
) -> tuple[PieBench, list[PieRecord]]:
    """The data set and the records a run works on: ``types``/``ids`` selected, the first ``limit`` in id order."""
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
    return dataset, records


def run_bench(
    config: RunConfig,
    data: str | Path | PieBench,
    out: str | Path,
    *,
    types: Sequence[int] | None = None,
    ids: Sequence[str] | None = None,
    limit: int | None = None,
    device: str | None = None,
    editor_factory: Callable[[RunConfig, torch.device], EditorLike] | None = None,
    metrics: Callable[..., dict[str, float]] | None = None,
    progress: bool = True,
    weights: str | Path | None = None,
    runtime: dict[str, Any] | None = None,
    batch_size: int = 1,
) -> Path:
    """Edit every selected image not yet done in ``out`` and write its record; returns ``metrics.csv``.

    ``batch_size``: images inverted, edited and reconstructed together, in one model call per solver stage
    (:func:`image_batches`); like ``runtime``, a speed setting, not part of the run's identity: each image is
    still written on its own as soon as it is done, and its numbers equal batch size 1's to float round-off.
    ``editor_factory(config, device)`` builds the editor (default: :func:`load_editor`, with the ``runtime``
    options); ``metrics`` is a
    ``(source, edited, mask, prompt) -> dict`` callable (default: a :class:`MetricSuite` with pretrained
    weights for ``config.metrics``, looked up in the ``weights`` folder first; its ``lpips`` network, if any,
    also scores ``recon_lpips``). The editor is built only if an image remains to be edited, the metrics if one
    remains to be edited or scored: a done image whose record lacks one of ``config.metrics`` is scored from
    its saved images, not edited again.
    """
    check_batch_size(batch_size)
    if batch_size > 1 and (config.control is not None or config.inversion == "null-text"):
        what = f"--control {config.control}" if config.control is not None else "--inversion null-text"
        raise ValueError(f"--batch-size {batch_size} does not combine with {what}: those edit one image at a time")
    dataset, records = select_records(data, types=types, ids=ids, limit=limit)
    for record in records:
        record.mask()  # validate every selected record before any work
    prompts = prompt_pairs(dataset, config.prompts)

    proc = _process(device)
    if config.dtype == "auto":
        config = RunConfig.from_dict({**config.to_dict(), "dtype": _auto_dtype(config.model, proc.device)})
    run_dir = Path(out)
    if (run_dir / CONFIG_FILE).exists():
        _claim_config(run_dir, config, dataset.root)  # a different configuration is refused before any work

    mine = records[proc.rank :: proc.world]
    done = {r.id: _load_record(run_dir / "records" / f"{r.id}.json") for r in mine}
    shard = [r for r in mine if done[r.id] is None]
    columns = score_columns(config.metrics, config.reconstruct)
    unscored = [r for r in mine if done[r.id] is not None and _missing(done[r.id], columns)]
    if shard:
        # Built before the folder is claimed: a configuration the editor refuses (a typo in a solver option,
        # a missing model) must not leave behind a run folder that holds it.
        factory = editor_factory or functools.partial(load_editor, runtime=runtime)
        editor = factory(config, proc.device)
        _check_edit_size(editor, shard[0])
    suite = metrics
    if suite is None and (shard or unscored):
        names = config.metrics if shard else _needed([done[r.id] for r in unscored], columns, config.metrics)
        suite = MetricSuite(names, device=proc.device, weights=weights) if names else None
    try:
        for sub in ("edited", "recon", "records", "locks"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create run folder {run_dir}: {err.strerror or err}") from None
    _claim_config(run_dir, config, dataset.root)
    if shard:
        batches = image_batches(shard, batch_size)
        _run_shard(config, batches, prompts, run_dir, editor, suite, progress and proc.rank == 0, proc.world)
    if unscored:
        _score_images(run_dir, unscored, columns, suite, progress and proc.rank == 0)
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


def check_batch_size(batch_size: Any) -> int:
    """``batch_size`` if it is a positive integer, else a ValueError."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    return batch_size


def image_batches(records: Sequence[PieRecord], batch_size: int) -> list[list[PieRecord]]:
    """``records`` in batches of up to ``batch_size`` images of one size (PIE-Bench's are all 512x512), in
    order within each size."""
    by_size: dict[tuple[int, int], list[PieRecord]] = {}
    for record in records:
        by_size.setdefault(record.image_size(), []).append(record)
    return [group[i : i + batch_size] for group in by_size.values() for i in range(0, len(group), batch_size)]


def _run_shard(
    config: RunConfig,
    batches: list[list[PieRecord]],
    prompts: dict[str, tuple[str, str]],
    run_dir: Path,
    editor: EditorLike,
    suite: Callable[..., dict[str, float]],
    progress: bool,
    world: int,
) -> None:
    from tqdm.auto import tqdm

    total = sum(map(len, batches))
    bar = tqdm(total=total, unit="img", disable=not progress, desc=f"{run_dir.name} (rank 0 of {world})")
    try:
        for batch in batches:
            with contextlib.ExitStack() as locks:  # held until the whole batch is written
                todo = [record for record in batch if _claim_image(run_dir, record, locks)]
                if todo:
                    _run_batch(config, todo, prompts, run_dir, editor, suite)
            bar.update(len(batch))
    finally:
        bar.close()
        if world == 1:  # keep the table current even after an interruption
            write_table(run_dir)


def _claim_image(run_dir: Path, record: PieRecord, locks: contextlib.ExitStack) -> bool:
    """Lock an image (held by ``locks``) and clear a killed writer's leftovers, unless another process holds it
    or finished it meanwhile: then False."""
    mine = locks.enter_context(_image_lock(run_dir / "locks" / f"{record.id}.lock"))
    if not mine or _load_record(run_dir / "records" / f"{record.id}.json") is not None:
        return False
    for folder, suffix in (("edited", ".png"), ("recon", ".png"), ("records", ".json")):
        _remove_leftovers(run_dir / folder / f"{record.id}{suffix}")
    return True


def _run_batch(
    config: RunConfig,
    records: list[PieRecord],
    prompts: dict[str, tuple[str, str]],
    run_dir: Path,
    editor: EditorLike,
    suite: Callable[..., dict[str, float]],
) -> None:
    """Invert, edit and reconstruct ``records`` together, then score and write them one by one.

    A divergence in a batch redoes its images one at a time, so that each image's record says what it says at
    batch size 1 (only the images that diverge are marked)."""
    torch.manual_seed(config.seed)  # per batch (per image at batch size 1, as the official scripts): order-free
    images = [record.image() for record in records]
    start = time.perf_counter()
    try:
        method = {"method": config.inversion} if config.inversion != "plain" else {}  # only where asked
        inversion = editor.invert(images, [prompts[r.id][0] for r in records], **method)
        if config.control is not None:  # one image per batch (run_bench): its own control keywords
            edited = editor.edit(inversion, [prompts[records[0].id][1]], **edit_keywords(config, records[0]))
        else:
            edited = editor.edit(inversion, [[prompts[r.id][1]] for r in records])
        recon = _reconstruct(editor, inversion) if config.reconstruct else [(None, None)] * len(records)
    except SolverDivergence as err:
        if len(records) > 1:
            for record in records:
                _run_batch(config, [record], prompts, run_dir, editor, suite)
            return
        outputs: list[Any] = [err]
    else:
        if len(edited) != len(records):
            raise ValueError(f"the editor returned {len(edited)} edits for {len(records)} images")
        outputs = [(e, *r) for e, r in zip(edited, recon)]
    share = (time.perf_counter() - start) / len(records)  # the model's time, per image
    for record, image, output in zip(records, images, outputs):
        _write_image(config, record, image, prompts[record.id], run_dir, suite, output, share)


def _write_image(
    config: RunConfig,
    record: PieRecord,
    image: Image.Image,
    prompts: tuple[str, str],
    run_dir: Path,
    suite: Callable[..., dict[str, float]],
    output: tuple[Image.Image, Image.Image | None, float | None] | SolverDivergence,
    seconds: float,
) -> None:
    """Score one image's ``output`` (edit, reconstruction, latent RMSE; or its divergence) and write its PNGs,
    then its record, which marks it done."""
    source_prompt, target_prompt = prompts
    start = time.perf_counter()
    mask = record.mask()
    row: dict[str, Any] = {"image_id": record.id, "editing_type_id": record.edit_type}
    columns = score_columns(config.metrics, config.reconstruct)
    if isinstance(output, SolverDivergence):
        nan = dict.fromkeys((*columns, *(["recon_latent_rmse"] if config.reconstruct else [])), math.nan)
        row.update(nan, diverged=1, error=str(output))
    else:
        edited, recon, latent_rmse = output
        _atomic_write(run_dir / "edited" / f"{record.id}.png", _png(edited))
        if recon is not None:
            _atomic_write(run_dir / "recon" / f"{record.id}.png", _png(recon))
            row["recon_latent_rmse"] = latent_rmse
        row.update(image_scores(image, mask, target_prompt, edited, recon, columns, suite), diverged=0)
    row.update(
        source_prompt=source_prompt,
        target_prompt=target_prompt,
        seconds=round(seconds + time.perf_counter() - start, 3),
        edited_fraction=float(np.mean(mask)),
    )
    _atomic_write(run_dir / "records" / f"{record.id}.json", json.dumps(row, indent=1).encode("utf-8"))


def _reconstruct(editor: EditorLike, inversion: Any) -> list[tuple[Image.Image, float]]:
    """Each image's reconstruction and its latent round-trip error: the RMS difference between the regenerated
    latent and the encoded source latent (``inversion.source``), row by row."""
    latent, source = editor.reconstruct(inversion, output_type="latent"), inversion.source
    if tuple(latent.shape) != tuple(source.shape):
        raise ValueError(f"the reconstructed latent is {tuple(latent.shape)}, the source's {tuple(source.shape)}")
    images = editor.decode_latents(latent)
    diff = latent.detach().double().cpu() - source.detach().double().cpu()
    return [(image, float(torch.sqrt(torch.mean(d**2)))) for image, d in zip(images, diff)]


# -- scoring -----------------------------------------------------------------------------------------


def score_columns(metrics: Sequence[str], reconstruct: bool = True) -> tuple[str, ...]:
    """The record columns that scoring fills for ``metrics``: those metrics and, when the run reconstructs, the
    reconstruction's PSNR, MSE, SSIM (and LPIPS if ``lpips`` is among them). Not ``recon_latent_rmse``: it
    needs the model, so only the edit computes it."""
    recon = [c for c in RECON_METRICS if c != "recon_lpips" or "lpips" in metrics] if reconstruct else []
    return (*parse_metrics(metrics), *recon)


def _missing(row: dict[str, Any], columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c not in row]


def _needed(rows: Sequence[dict[str, Any]], columns: Sequence[str], names: Sequence[str]) -> list[str]:
    """The metrics whose networks scoring these records' missing ``columns`` needs (diverged ones need none)."""
    needed = {c for r in rows if not r.get("diverged") for c in _missing(r, columns)}
    return [m for m in names if m in needed or (m == "lpips" and "recon_lpips" in needed)]


def image_scores(
    source: Image.Image,
    mask: np.ndarray,
    prompt: str,
    edited: Image.Image,
    recon: Image.Image | None,
    columns: Sequence[str],
    suite: Callable[..., dict[str, float]],
) -> dict[str, float]:
    """The ``columns`` of one image: the edit's metrics from ``suite`` (and what else it returns), the
    reconstruction's against the source (``recon_lpips`` with ``suite.lpips``, when the suite has one). Both
    images are compared as the official evaluation does (:func:`align_edit`)."""
    out: dict[str, float] = {}
    if any(c in METRICS for c in columns):
        values = suite(source, align_edit(edited, source.size).convert("RGB"), mask, prompt)
        out.update({k: float(v) for k, v in values.items()})
    if recon is not None and any(c in RECON_METRICS for c in columns):
        lpips = getattr(suite, "lpips", None) if "recon_lpips" in columns else None
        values = reconstruction_metrics(source, align_edit(recon, source.size).convert("RGB"), lpips)
        out.update({k: v for k, v in values.items() if k in columns})
    return out


def _score_images(
    run_dir: Path,
    records: Sequence[PieRecord],
    columns: Sequence[str],
    suite: Callable[..., dict[str, float]] | None,
    progress: bool,
) -> None:
    """Fill the missing ``columns`` of these done images from their saved PNGs, one image at a time under its
    lock (waiting for a process that holds it), each record rewritten atomically."""
    from tqdm.auto import tqdm

    for record in tqdm(records, unit="img", disable=not progress, desc=f"{run_dir.name} (scoring)"):
        path = run_dir / "records" / f"{record.id}.json"
        with _image_lock(run_dir / "locks" / f"{record.id}.lock", wait=True):
            row = _load_record(path)
            missing = [] if row is None else _missing(row, columns)
            if not missing:  # not done after all, or scored meanwhile by another process
                continue
            if row.get("diverged"):
                row.update(dict.fromkeys(missing, math.nan))  # no images to score
            else:
                recon = None
                if any(c in RECON_METRICS for c in missing):
                    recon = _saved_image(run_dir / "recon" / f"{record.id}.png")
                edited = _saved_image(run_dir / "edited" / f"{record.id}.png")
                prompt = row.get("target_prompt", record.target_prompt)
                values = image_scores(record.image(), record.mask(), prompt, edited, recon, missing, suite)
                row.update({k: v for k, v in values.items() if k in missing})
            _remove_leftovers(path)
            _atomic_write(path, json.dumps(row, indent=1).encode("utf-8"))


def _saved_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise ValueError(f"{path} is missing: this image cannot be scored (delete its record to redo it)")
    with Image.open(path) as image:
        return image.convert("RGB")


def score_run(
    run_dir: str | Path,
    metrics: str | Sequence[str] | None = None,
    *,
    data: str | Path | None = None,
    device: str | None = None,
    weights: str | Path | None = None,
    suite: Callable[..., dict[str, float]] | None = None,
    progress: bool = True,
) -> Path:
    """Compute the ``metrics`` (default: all) that the done images of ``run_dir`` lack, from their saved images
    and the data set (``data``, default: the path in ``config.json``), without the diffusion model; then
    rebuild ``metrics.csv`` and return its path. Resumable and safe beside a running ``bench`` on the same folder.

    ``suite``: a ``(source, edited, mask, prompt) -> dict`` callable (default: a :class:`MetricSuite` of the
    missing metrics, built only if one is missing, weights from ``weights`` first).
    """
    run_dir = Path(run_dir)
    config, stored_data = read_run(run_dir)
    names = parse_metrics(metrics)
    columns = score_columns(names, config.reconstruct)
    rows = [r for r in read_records(run_dir) if _missing(r, columns)]
    if rows:
        dataset = PieBench(data if data is not None else stored_data, ids=[r["image_id"] for r in rows])
        wanted = _needed(rows, columns, names)
        if suite is None and wanted:
            check_device(device)
            dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            suite = MetricSuite(wanted, device=dev, weights=weights)
        _score_images(run_dir, list(dataset), columns, suite, progress)
    return write_table(run_dir)
