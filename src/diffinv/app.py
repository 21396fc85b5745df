"""The diffinv web app: several inversion solvers on one image, side by side (a Gradio page and API).

:func:`compare` is the whole computation: each ticked solver inverts the image once under the source prompt
(cached: a second call with only new targets reuses it), reconstructs it and edits every target in one batch.
A :class:`Backend` supplies the model: :class:`DigitsBackend`, the shipped trained digits network (the default;
offline, seconds on a CPU), :class:`ToyBackend`, the exact toy scenes of ``diffinv demo``, or
:class:`EditorBackend`, a diffusers model through :class:`diffinv.editor.Editor`.
:func:`build_app` puts a Gradio page over it; the button's function is also the API endpoint ``"compare"``.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import tempfile
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .images import image_grid, load_image, pil_to_tensor, psnr, tensor_to_pil
from .solve import SolverDivergence
from .solvers import SPACING_CHOICES, get_solver, list_solvers, resolve_spacing

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "DEFAULT_SOLVERS",
    "Backend",
    "CompareResult",
    "DigitsBackend",
    "EditorBackend",
    "FieldBackend",
    "Settings",
    "ToyBackend",
    "build_app",
    "compare",
    "load_backend",
    "parse_targets",
]

DEFAULT_SOLVERS = ("ees27", "ees27_sym", "edict", "ddim")
TABLE_COLUMNS = ["solver", "grid", "round-trip RMSE", "reconstruction PSNR dB", "background PSNR dB", "model calls"]
TABLE_COLUMNS += ["seconds"]
CACHE_SIZE = 32  # inversions kept (one per image, prompt, solver and settings)
DIGITS = tuple("0123456789")  # the digits model's prompts (also as "digit 8")
TOY_DISPLAY = 96  # built-in models' images are 16 px: shown enlarged (nearest) so that captions fit


@dataclass(frozen=True)
class Settings:
    """The solver settings shared by every solver of one comparison (``inversion_guidance=None``: = ``guidance``)."""

    steps: int = 50
    guidance: float = 3.0
    inversion_guidance: float | None = None
    strength: float = 1.0
    spacing: str = "auto"
    smoothing: tuple[str, ...] = ()

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be an integer in [1, 1000], got {self.steps!r}")
        for name in ("guidance", "inversion_guidance"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.strength, (int, float)) and 0 < self.strength <= 1):
            raise ValueError(f"strength must be in (0, 1], got {self.strength!r}")
        if self.spacing not in SPACING_CHOICES:
            raise ValueError(f"spacing must be one of {', '.join(SPACING_CHOICES)}, got {self.spacing!r}")


class Backend:
    """A model the app can compare solvers on: prepares images, inverts, reconstructs and edits.

    ``invert`` returns an opaque handle that ``reconstruct``/``edit`` take; they return ``(3, H, W)`` images in
    ``[-1, 1]``. ``calls`` counts model evaluations (reset by the caller).
    """

    name = "model"
    model: str | None = None  # what provenance records as the model (None: built in)
    smoothing: tuple[str, ...] = ()
    threads: int | None = None  # torch CPU threads while computing (None: leave as is)
    calls = 0

    def prepare(self, image: Any) -> Tensor:
        """The image as the model's ``(3, H, W)`` input in ``[-1, 1]``."""
        raise NotImplementedError

    def invert(self, image: Tensor, source: str, solver: str, settings: Settings) -> Any:
        raise NotImplementedError

    def reconstruct(self, handle: Any) -> Tensor:
        raise NotImplementedError

    def edit(self, handle: Any, targets: Sequence[str], settings: Settings) -> list[Tensor]:
        raise NotImplementedError

    def check_prompt(self, prompt: str, what: str) -> None:
        """Raise ``ValueError`` if the model cannot take ``prompt``."""
        if not prompt.strip():
            raise ValueError(f"{what} is empty")

    def edit_mask(self, source: str, target: str) -> Tensor | None:
        """The ``(H, W)`` region an edit may change when the model knows it (the toy scenes do), else None."""
        return None

    def display(self, image: Tensor) -> Image.Image:
        """An image as shown in the grid."""
        return tensor_to_pil(image[None])[0]

    def settings_record(self, solver: str, settings: Settings) -> dict[str, Any]:
        """The resolved settings of one solver, for the settings JSON."""
        return {"model": self.name, "solver": solver, **asdict(settings)}

    def examples(self) -> list[tuple[Image.Image, str, str]]:
        """Bundled examples: ``(image, source prompt, newline-separated target prompts)``."""
        return []


class FieldBackend(Backend):
    """A built-in model given as a guided ``eps(x, t)`` field on a schedule, solved by :mod:`diffinv.solve` itself.

    Subclasses say how prompts become a guided field (:meth:`guided`) and how the app's ``(3, H, W)`` images
    map to the model's state (:meth:`to_state`, :meth:`from_state`). The state is float64, so exactly
    reversible solvers round-trip to float64 round-off.
    """

    threads = 1  # tiny tensors: more threads only wait on each other (as in diffinv demo)
    schedule: Any  # the model's NoiseSchedule

    def guided(
        self, prompts: str | list[str], guidance: float, negative: str | None
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """The guided field of ``prompts`` (one, or one per sample); ``negative`` replaces the unconditional branch."""
        raise NotImplementedError

    def to_state(self, image: Tensor) -> Tensor:
        """A prepared ``(3, H, W)`` image as a batch of one model input."""
        return image[None]

    def from_state(self, x: Tensor) -> Tensor:
        """Model outputs ``(N, C, H, W)`` as app images ``(N, 3, H, W)``."""
        return x

    def _timesteps(self, solver: str, settings: Settings) -> Tensor:
        from .demo import grid_timesteps
        from .schedules import make_grid

        schedule, steps = self.schedule, settings.steps
        spacing = resolve_spacing(get_solver(solver), settings.spacing)
        if settings.strength == 1.0:
            return grid_timesteps(schedule, steps, spacing)
        if spacing == "time":  # img2img: the last int(steps * strength) steps of the full grid
            return grid_timesteps(schedule, steps, spacing)[-max(1, int(steps * settings.strength)) - 1 :]
        return make_grid(schedule, max(1, round(steps * settings.strength)), spacing, settings.strength * schedule.T)

    def _field(self, prompts: str | list[str], guidance: float, negative: Any) -> Callable[[Tensor, Tensor], Tensor]:
        field = self.guided(prompts, guidance, negative)

        def counted(x: Tensor, t: Tensor) -> Tensor:
            self.calls += 1
            return field(x, t)

        return counted

    def invert(self, image: Tensor, source: str, solver: str, settings: Settings) -> Any:
        from .solve import invert

        npi = "npi" in settings.smoothing
        w = 1.0 if npi else (settings.guidance if settings.inversion_guidance is None else settings.inversion_guidance)
        inv = invert(
            self._field(source, w, None),
            self.to_state(image.double()),
            self.schedule,
            solver=solver,
            timesteps=self._timesteps(solver, settings),
        )
        return {"inv": inv, "source": source, "w": w, "npi": npi}

    def reconstruct(self, handle: Any) -> Tensor:
        from .solve import generate

        return self.from_state(generate(self._field(handle["source"], handle["w"], None), handle["inv"]))[0]

    def edit(self, handle: Any, targets: Sequence[str], settings: Settings) -> list[Tensor]:
        from .editor import _replicate  # the inverted state once per target, as Editor.edit batches it
        from .solve import generate

        batch = _replicate(handle["inv"], [0] * len(targets))
        negative = handle["source"] if handle["npi"] else None
        return list(self.from_state(generate(self._field(list(targets), settings.guidance, negative), batch)))

    def display(self, image: Tensor) -> Image.Image:
        return super().display(image).resize((TOY_DISPLAY, TOY_DISPLAY), Image.Resampling.NEAREST)

    def settings_record(self, solver: str, settings: Settings) -> dict[str, Any]:
        spacing = resolve_spacing(get_solver(solver), settings.spacing)
        return {
            **super().settings_record(solver, settings),
            "spacing": spacing,
            "timesteps": self._timesteps(solver, settings).tolist(),
        }


class ToyBackend(FieldBackend):
    """The exact toy scenes of ``diffinv demo`` (:class:`diffinv.analytic.ToyScenes`): prompts are its scene names."""

    name = "toy-scenes"

    def __init__(self, size: int = 16, source: str = "gray box"):
        from .analytic import ToyScenes

        self.scenes = ToyScenes(size=size)
        self.schedule = self.scenes.schedule
        self.source = source
        self.smoothing = ("npi",)

    def prepare(self, image: Any) -> Tensor:
        # A box filter: an example enlarged by an integer factor (nearest) comes back exactly.
        size = self.scenes.size
        return pil_to_tensor([load_image(image).resize((size, size), Image.Resampling.BOX)])[0].double()

    def check_prompt(self, prompt: str, what: str) -> None:
        super().check_prompt(prompt, what)
        if prompt not in self.scenes.names:
            names = ", ".join(map(repr, self.scenes.names))
            raise ValueError(f"{what} {prompt!r} is not a toy-scene prompt; choose one of {names}")

    def guided(
        self, prompts: str | list[str], guidance: float, negative: str | None
    ) -> Callable[[Tensor, Tensor], Tensor]:
        return self.scenes.guided(prompts, guidance, negative=negative)

    def edit_mask(self, source: str, target: str) -> Tensor | None:
        return self.scenes.edit_mask(source, target)

    def examples(self) -> list[tuple[Image.Image, str, str]]:
        targets = "\n".join(n for n in self.scenes.names if n != self.source)
        out = []
        for seed in (0, 1):
            x = self.scenes.sample(self.source, 1, generator=torch.Generator().manual_seed(seed))
            out.append((self.display(x[0]), self.source, targets))
        return out


class DigitsBackend(FieldBackend):
    """The shipped trained digits network (:mod:`diffinv.models.digits`): prompts are digits, ``"digit 8"`` or ``"8"``.

    Images are shown grey, light strokes on black as the model was trained (16x16, one channel: the app's
    RGB input is averaged to grey). Class-conditional guidance as in ``diffinv demo --model digits``.
    """

    name = "digits"

    def __init__(self, source: int = 3, targets: Sequence[int] = (1, 5, 8)):
        from .models.digits import load_digits_model

        self.net = load_digits_model()
        self.schedule = self.net.schedule
        self.source, self.targets = source, tuple(targets)
        self.smoothing = ("npi",)

    @staticmethod
    def digit(prompt: str) -> int | None:
        """The digit a prompt names (``"8"``, ``"digit 8"``, any case), else None."""
        words = prompt.strip().lower().split()
        if words[:1] == ["digit"]:
            words = words[1:]
        return int(words[0]) if len(words) == 1 and words[0] in DIGITS else None

    def prepare(self, image: Any) -> Tensor:
        size = self.net.shape[-1]
        rgb = pil_to_tensor([load_image(image).resize((size, size), Image.Resampling.BOX)])[0].double()
        return rgb.mean(0, keepdim=True).expand(3, -1, -1).clone()

    def to_state(self, image: Tensor) -> Tensor:
        return image[None, :1]

    def from_state(self, x: Tensor) -> Tensor:
        return x.expand(-1, 3, -1, -1)

    def check_prompt(self, prompt: str, what: str) -> None:
        super().check_prompt(prompt, what)
        if self.digit(prompt) is None:
            raise ValueError(f"{what} {prompt!r} is not a digits prompt; write a digit 0-9, e.g. 'digit 8' or '8'")

    def guided(
        self, prompts: str | list[str], guidance: float, negative: str | None
    ) -> Callable[[Tensor, Tensor], Tensor]:
        labels = [self.digit(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        return self.net.eps(labels, guidance, negative=None if negative is None else self.digit(negative))

    def examples(self) -> list[tuple[Image.Image, str, str]]:
        targets = "\n".join(f"digit {d}" for d in self.targets)
        return [
            (self.display(x.expand(3, -1, -1)), f"digit {self.source}", targets)
            for x in self.net.sources(self.source, 2)
        ]


class EditorBackend(Backend):
    """A diffusers pipeline (SD 1.x/2.x, SDXL, whatever :class:`diffinv.editor.Editor` supports)."""

    def __init__(self, pipe: Any, model: str | None = None, **editor_options: Any):
        from .editor import Editor

        self.pipe, self.model, self.options = pipe, model, editor_options
        probe = Editor(pipe, progress=False, **editor_options)  # checks the pipeline once
        self.name = model or type(pipe).__name__
        self.family = probe.family
        self.size = probe.size
        self.smoothing = tuple(s for s in probe.family.smoothing if s != "smooth-lora")

    @classmethod
    def from_pretrained(cls, model: str, **options: Any) -> EditorBackend:
        """Load ``model`` (hub id or folder) as ``diffinv edit`` does."""
        from .editor import Editor

        editor = Editor.from_pretrained(model, progress=False, **options)
        return cls(editor.pipe, model=model)

    def _editor(self, solver: str, settings: Settings) -> Any:
        from .editor import Editor

        editor = Editor(
            self.pipe,
            solver=solver,
            steps=settings.steps,
            spacing=settings.spacing,
            guidance=settings.guidance,
            inversion_guidance=settings.inversion_guidance,
            strength=settings.strength,
            smoothing=settings.smoothing,
            progress=False,
            **self.options,
        )
        plain = editor.unet_eps

        def counted(x: Tensor, t: Tensor, cond: Any) -> Tensor:
            self.calls += 1
            return plain(x, t, cond)

        editor.unet_eps = counted
        return editor

    def prepare(self, image: Any) -> Tensor:
        return pil_to_tensor([load_image(image, self.size, "crop")])[0]

    def invert(self, image: Tensor, source: str, solver: str, settings: Settings) -> Any:
        editor = self._editor(solver, settings)
        with torch.inference_mode():
            return editor, editor.invert(tensor_to_pil(image[None])[0], source)

    def reconstruct(self, handle: Any) -> Tensor:
        editor, inv = handle
        return pil_to_tensor(editor.reconstruct(inv))[0]

    def edit(self, handle: Any, targets: Sequence[str], settings: Settings) -> list[Tensor]:
        editor, inv = handle
        return list(pil_to_tensor(editor.edit(inv, list(targets))))

    def settings_record(self, solver: str, settings: Settings) -> dict[str, Any]:
        from .provenance import editor_settings

        return editor_settings(self._editor(solver, settings), self.name)


def load_backend(model: str | None = None) -> Backend:
    """The backend of ``model``: a built-in name (:data:`BUILTIN_MODELS`; ``None``: :data:`DEFAULT_MODEL`),
    else a diffusers hub id or folder."""
    name = DEFAULT_MODEL if model is None else model
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]()
    return EditorBackend.from_pretrained(name)


# Built-in models by name (offline); the app runs DEFAULT_MODEL when no --model is given.
BUILTIN_MODELS: dict[str, Callable[[], Backend]] = {"digits": DigitsBackend, "toy": ToyBackend}
DEFAULT_MODEL = "digits"


# -- the comparison ------------------------------------------------------------------------------


@dataclass
class SolverResult:
    """One solver's row: reconstruction, edits, their scores, model calls and time."""

    solver: str
    spacing: str
    reconstruction: Tensor
    edits: list[Tensor]
    roundtrip_rmse: float
    reconstruction_psnr: float
    background_psnr: float
    calls: int
    seconds: float
    cached: bool
    diverged: str | None = None  # the divergence message; images are then blank


@dataclass
class CompareResult:
    """Everything one comparison produced: the source, one :class:`SolverResult` per solver, the grid, the record."""

    source: Tensor
    source_prompt: str
    targets: list[str]
    rows: list[SolverResult]
    grid: Image.Image
    record: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[list[Any]]:
        """The rows of :data:`TABLE_COLUMNS`."""
        return [
            [
                r.solver,
                r.spacing,
                "diverged" if r.diverged else f"{r.roundtrip_rmse:.2e}",
                _db(r.reconstruction_psnr),
                _db(r.background_psnr),
                r.calls,
                round(r.seconds, 2),
            ]
            for r in self.rows
        ]


def _db(value: float) -> str:
    return "-" if math.isnan(value) else "inf" if math.isinf(value) else f"{value:.1f}"


def parse_targets(targets: str | Sequence[str] | None) -> list[str]:
    """Target prompts from a list or newline-separated text (blank lines dropped).

    A text that is a list literal (``["a", "b"]``: what a Gradio text box makes of a list sent through the API)
    counts as that list.
    """
    if targets is None:
        return []
    if isinstance(targets, str) and targets.strip().startswith("[") and targets.strip().endswith("]"):
        try:
            items = ast.literal_eval(targets.strip())
        except (ValueError, SyntaxError):
            items = None
        if isinstance(items, list) and all(isinstance(t, str) for t in items):
            targets = items
    items = targets.splitlines() if isinstance(targets, str) else [str(t) for t in targets]
    return [t.strip() for t in items if t.strip()]


class InversionCache:
    """The last :data:`CACHE_SIZE` inversions, keyed on image, source prompt, solver and settings."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size, self.items = size, OrderedDict()

    @staticmethod
    def key(image: Tensor, source: str, solver: str, settings: Settings) -> tuple:
        digest = hashlib.sha256(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        return digest, source, solver, settings

    def get(self, key: tuple) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
        return self.items.get(key)

    def put(self, key: tuple, value: Any) -> None:
        self.items[key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)


def _mask_array(mask: Any, shape: tuple[int, int]) -> Any:
    """A mask as a 0/1 ``(H, W)`` array at the image's size: an image or array (white/nonzero = the edited
    region), or what a Gradio mask editor gives (``{"background", "layers", "composite"}``: the painted strokes,
    or the composite when nothing is painted). None when there is no mask."""
    import numpy as np

    if isinstance(mask, dict):
        layers = [la for la in mask.get("layers") or [] if la is not None]
        painted = [np.asarray(la.convert("RGBA"))[..., 3] > 0 for la in layers if isinstance(la, Image.Image)]
        if any(m.any() for m in painted):
            mask = Image.fromarray((np.logical_or.reduce(painted) * 255).astype(np.uint8))
        else:
            mask = mask.get("composite") if mask.get("composite") is not None else mask.get("background")
    if mask is None:
        return None
    gray = load_image(mask, shape, "stretch").convert("L")
    return (np.asarray(gray) > 127).astype(np.float32)


def _background_psnr(source: Image.Image, edits: list[Image.Image], masks: list[Any]) -> float:
    """Mean background PSNR (PIE-Bench's, :func:`diffinv.metrics.background_psnr`) of the edits that have a mask."""
    from .metrics import background_psnr

    values = [background_psnr(source, e, m) for e, m in zip(edits, masks) if m is not None]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def compare(
    backend: Backend,
    image: Any,
    source: str,
    targets: str | Sequence[str],
    solvers: Sequence[str],
    settings: Settings | None = None,
    mask: Any = None,
    cache: InversionCache | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> CompareResult:
    """Invert ``image`` once per solver (or reuse ``cache``), reconstruct it and edit every target in one batch.

    ``mask``: the edited region (white) for the background PSNR; without it the backend's own mask if it knows one.
    Bad input raises ``ValueError`` before any model call.
    """
    settings = settings or Settings()
    settings.check()
    if image is None:
        raise ValueError("give an image (upload one or pick an example)")
    source = (source or "").strip()
    backend.check_prompt(source, "source prompt")
    targets = parse_targets(targets)
    if not targets:
        raise ValueError("give at least one target prompt (one per line)")
    for t in targets:
        backend.check_prompt(t, "target prompt")
    names = [str(s).strip() for s in (solvers or []) if str(s).strip()]
    if not names:
        raise ValueError("tick at least one solver")
    for name in names:
        get_solver(name)  # ValueError listing the known names
    unsupported = [s for s in settings.smoothing if s not in backend.smoothing]
    if unsupported:
        allowed = ", ".join(backend.smoothing) or "none"
        raise ValueError(f"smoothing {', '.join(unsupported)} is not available for {backend.name} (have: {allowed})")
    x = backend.prepare(image)
    mask = None if mask is None else _mask_array(mask, tuple(x.shape[1:]))
    if mask is not None:
        masks = [mask] * len(targets)
    else:
        masks = [backend.edit_mask(source, t) for t in targets]
        masks = [None if m is None else m.numpy() for m in masks]
    cache = InversionCache() if cache is None else cache
    threads = torch.get_num_threads()
    if backend.threads:
        torch.set_num_threads(backend.threads)
    try:
        return _compare(backend, x, source, targets, names, settings, masks, mask is not None, cache, progress)
    finally:
        torch.set_num_threads(threads)


def _compare(
    backend: Backend,
    x: Tensor,
    source: str,
    targets: list[str],
    names: list[str],
    settings: Settings,
    masks: list[Any],
    given_mask: bool,
    cache: InversionCache,
    progress: Callable[[float, str], None] | None,
) -> CompareResult:
    source_pil = tensor_to_pil(x[None])[0]
    report = progress or (lambda fraction, desc: None)
    rows, settings_json = [], {}
    for i, name in enumerate(names):
        report(i / len(names), f"{name}: inverting")
        backend.calls = 0
        start = time.perf_counter()
        key = cache.key(x, source, name, settings)
        handle = cache.get(key)
        cached = handle is not None
        diverged = None
        try:
            with torch.inference_mode():
                if handle is None:
                    handle = backend.invert(x, source, name, settings)
                    cache.put(key, handle)
                report((i + 0.4) / len(names), f"{name}: reconstructing")
                recon = backend.reconstruct(handle)
                report((i + 0.6) / len(names), f"{name}: editing {len(targets)} target(s)")
                edits = backend.edit(handle, targets, settings)
        except SolverDivergence as err:  # this solver's row says so; the others still run
            diverged = str(err)
            recon, edits = torch.zeros_like(x), [torch.zeros_like(x) for _ in targets]
        seconds = time.perf_counter() - start
        recon_pil = tensor_to_pil(recon[None])[0]
        edits_pil = tensor_to_pil(torch.stack(edits))
        nan = math.nan
        rows.append(
            SolverResult(
                solver=name,
                spacing=resolve_spacing(get_solver(name), settings.spacing),
                reconstruction=recon,
                edits=edits,
                roundtrip_rmse=nan if diverged else (recon.double() - x.double()).pow(2).mean().sqrt().item(),
                reconstruction_psnr=nan if diverged else psnr(source_pil, recon_pil),
                background_psnr=nan if diverged else _background_psnr(source_pil, edits_pil, masks),
                calls=backend.calls,
                seconds=seconds,
                cached=cached,
                diverged=diverged,
            )
        )
        settings_json[name] = backend.settings_record(name, settings)
    report(1.0, "done")
    result = CompareResult(x, source, targets, rows, _grid(backend, x, targets, rows))
    from .provenance import record

    result.record = record("uploaded image", source, settings_json, backend.model)
    result.record["target_prompts"] = targets
    result.record["mask"] = "given" if given_mask else "model" if any(m is not None for m in masks) else None
    result.record["table"] = [dict(zip(TABLE_COLUMNS, row)) for row in result.table()]
    return result


def _grid(backend: Backend, source: Tensor, targets: list[str], rows: list[SolverResult]) -> Image.Image:
    """One captioned row per solver (:func:`diffinv.images.image_grid`): source, reconstruction, each edit."""
    lines = []
    for r in rows:
        images = [backend.display(t) for t in [source, r.reconstruction, *r.edits]]
        recon = "diverged" if r.diverged else f"reconstruction {_db(r.reconstruction_psnr)} dB"
        captions = [f"{r.solver}: source", recon, *targets]
        lines.append(image_grid(images, captions=captions))
    grid = Image.new("RGB", (max(g.width for g in lines), sum(g.height for g in lines)), (255, 255, 255))
    y = 0
    for g in lines:
        grid.paste(g, (0, y))
        y += g.height
    return grid


def write_zip(result: CompareResult, path: str | Path) -> Path:
    """The grid, every image (PNG) and ``settings.json`` in one zip file."""

    def png(image: Image.Image) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    path = Path(path)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("grid.png", png(result.grid))
        z.writestr("source.png", png(tensor_to_pil(result.source[None])[0]))
        outputs = {}
        for r in result.rows:
            z.writestr(f"{r.solver}/reconstruction.png", png(tensor_to_pil(r.reconstruction[None])[0]))
            outputs[f"{r.solver}/reconstruction.png"] = {"solver": r.solver, "prompt": result.source_prompt}
            for k, (edit, target) in enumerate(zip(r.edits, result.targets), start=1):
                z.writestr(f"{r.solver}/edit_{k}.png", png(tensor_to_pil(edit[None])[0]))
                outputs[f"{r.solver}/edit_{k}.png"] = {"solver": r.solver, "target_prompt": target}
        z.writestr("settings.json", json.dumps({**result.record, "outputs": outputs}, indent=2, sort_keys=True))
    return path


# -- the page ------------------------------------------------------------------------------------


def build_app(backend: Backend | None = None) -> Any:
    """The Gradio page over ``backend`` (default: :func:`load_backend`)."""
    import gradio as gr

    backend = load_backend() if backend is None else backend
    cache = InversionCache()
    solvers = list_solvers()
    outdir = Path(tempfile.mkdtemp(prefix="diffinv-app-"))

    def run(
        image: Any,
        source_prompt: str,
        target_prompts: str | list[str],
        solver_names: list[str] | str,
        steps: float = 50,
        guidance: float = 3.0,
        inversion_guidance: float | None = None,
        strength: float = 1.0,
        spacing: str = "auto",
        smoothing: list[str] | None = None,
        mask: Any = None,
        progress: Any = gr.Progress(),  # noqa: B008 (Gradio's way to get a progress bar)
    ) -> tuple[Image.Image, list[list[Any]], str]:
        try:
            if isinstance(solver_names, str):
                solver_names = [s for s in solver_names.replace(",", " ").split() if s]
            if steps is None or float(steps) != int(float(steps)):
                raise ValueError(f"steps must be an integer, got {steps!r}")
            settings = Settings(
                steps=int(steps),
                guidance=3.0 if guidance is None else float(guidance),
                inversion_guidance=None if inversion_guidance in (None, "") else float(inversion_guidance),
                strength=1.0 if strength is None else float(strength),
                spacing=spacing or "auto",
                smoothing=tuple(smoothing or ()),
            )
            result = compare(
                backend,
                image,
                source_prompt,
                target_prompts,
                solver_names,
                settings,
                mask=mask,
                cache=cache,
                progress=lambda f, d: progress(f, desc=d),
            )
        except (ValueError, TypeError) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise gr.Error(message, print_exception=False) from None  # bad input: no trace in the console either
        except Exception as err:  # a failure inside the model: still a message, not a trace
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise gr.Error(f"{type(err).__name__}: {first}") from None
        path = write_zip(result, Path(tempfile.mkdtemp(dir=outdir)) / "diffinv-compare.zip")
        return result.grid, result.table(), str(path)

    examples = backend.examples()
    example_rows = []
    for k, (image, source_prompt, targets) in enumerate(examples):
        p = outdir / f"example_{k}.png"
        image.save(p)
        example_rows.append([str(p), source_prompt, targets])
    default_source, default_targets = (examples[0][1], examples[0][2]) if examples else ("", "")
    ticked = [s for s in DEFAULT_SOLVERS if s in solvers]

    with gr.Blocks(title="diffinv: compare inversion solvers", analytics_enabled=False) as demo:
        gr.Markdown(
            f"## diffinv: compare inversion solvers\nModel: **{backend.name}**. Each ticked solver inverts the image "
            "under the source prompt, reconstructs it (round trip) and regenerates it under every target prompt."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="image", elem_id="image")
                source = gr.Textbox(value=default_source, label="source prompt", elem_id="source")
                target = gr.Textbox(
                    value=default_targets, lines=3, label="target prompts (one per line)", elem_id="targets"
                )
                chosen = gr.CheckboxGroup(solvers, value=ticked, label="solvers", elem_id="solvers")
                with gr.Accordion("settings", open=False):
                    steps = gr.Slider(1, 200, value=50, step=1, label="steps")
                    guidance = gr.Number(value=3.0, label="guidance")
                    inv_guidance = gr.Number(value=None, label="inversion guidance (empty: = guidance)")
                    strength = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="strength")
                    spacing = gr.Dropdown(list(SPACING_CHOICES), value="auto", label="spacing")
                    smoothing = gr.CheckboxGroup(list(backend.smoothing), value=[], label="smoothing")
                    mask = gr.ImageMask(
                        type="pil",
                        label="edit mask (optional): paint the edited region over the image, or upload a white-on-"
                        "black mask",
                    )
                button = gr.Button("compare", variant="primary", elem_id="compare")
            with gr.Column():
                grid = gr.Image(type="pil", format="png", label="one row per solver", elem_id="grid")
                table = gr.Dataframe(headers=TABLE_COLUMNS, label="per solver", elem_id="table", interactive=False)
                download = gr.File(label="images + settings.json")
        if example_rows:
            gr.Examples(example_rows, [image, source, target], label="examples")
        button.click(
            run,
            [image, source, target, chosen, steps, guidance, inv_guidance, strength, spacing, smoothing, mask],
            [grid, table, download],
            api_name="compare",
        )
    return demo
