"""Real-image editing with diffusers models: thin glue between a model-family adapter and the solvers.

The :class:`Editor` takes a diffusers pipeline, finds its family adapter (:mod:`diffinv.families`: prompts,
latents, the denoiser call, the schedule) and builds the guided noise model ``eps(x, t)`` that
:func:`diffinv.invert` and :func:`diffinv.generate` integrate. Everything numerical (grids, solvers,
inversion) is diffinv's; everything that differs between model families is the adapter's.

* Invert once, edit many: :meth:`Editor.edit` replicates the inverted state across the target
  prompts and runs one batched pass per model call (classifier-free guidance batched as well:
  one UNet call of batch ``2 * images * targets``). No trajectory is stored unless proximal
  guidance needs it, so memory does not grow with the number of steps.
* Mixed precision: the UNet and VAE run in the pipeline's dtype (fp16/bf16 on GPUs) while the
  solver state stays in ``solver_dtype`` (float32 by default, float64 on request).
* Guidance (reference/solvers.md §2): ``eps = eps(uncond) + w (eps(cond) - eps(uncond))`` with the
  null/negative prompt as ``uncond``; inversion uses ``inversion_guidance`` (default: the same ``w``,
  so that an exactly reversible solver reconstructs exactly), editing uses ``guidance``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .controls import DirectOffsets, P2POptions, PromptToPrompt, strip_markers
from .devices import check_device
from .families import Conditioning, family_for_model, family_of
from .fields import EpsModel, FlowEpsModel, as_eps_model
from .images import RESIZE_MODES, ImageLike, load_image, pil_to_tensor, tensor_to_pil
from .inversions import check_method, direct_offsets, null_text_embeddings, pivot_inversion
from .runtime import check_options, configure
from .smoothing import SMOOTH_LORA_ID, ProximalGuidance, load_lora, parse_smoothing
from .solve import Inversion, generate, invert
from .solvers import Solver, State, get_solver, resolve_spacing

__all__ = ["DEFAULT_MODEL", "Conditioning", "EditInversion", "Editor"]

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Guidance defaults (README "Defaults"): 3 for inversion-based editing with (near-)reversible solvers,
# as the EDICT/BDIA/BELM/Rex scripts use 2-3; 7.5 when NPI is on, as NPI/ProxNPI and PIE-Bench's P2P rows do.
DEFAULT_GUIDANCE = 3.0
DEFAULT_NPI_GUIDANCE = 7.5
OUTPUT_TYPES = ("pil", "latent")
CONTROLS = (None, "p2p")


@dataclass
class EditInversion(Inversion):
    """An :class:`Inversion` of images plus what editing and reconstruction need.

    ``cond``/``uncond``: the source prompts' and the null/negative conditioning used to invert
    (``uncond`` is ``None`` under NPI, which inverts with the source prompt alone); ``guidance``:
    the inversion guidance; ``source``: the clean latent; ``trajectory``: the inversion states by
    grid index, kept only for proximal guidance.
    """

    prompts: list[str] = field(default_factory=list)
    cond: Conditioning | None = None
    uncond: Conditioning | None = None
    guidance: float = 1.0
    source: Tensor | None = None
    images: list[Image.Image] = field(default_factory=list)
    trajectory: dict[int, dict[str, Tensor]] | None = None
    method: str = "plain"  # or "null-text" / "direct" (diffinv.inversions)
    null_embeddings: Tensor | None = None  # null-text: unconditional text states per step (steps, N, L, D)
    offsets: Tensor | None = None  # direct: per-step source-branch differences (steps, N, C, h, w)


class _GuidedEps:
    """``eps(x, t)`` with classifier-free guidance in one UNet call on ``[uncond; cond]``.

    The family says how guidance enters (:meth:`~diffinv.families.ModelFamily.guidance_inputs`: a
    guidance-distilled family takes the scale as a model input instead). With proximal guidance the CFG
    difference is thresholded (per image: ``groups`` equal row blocks) and the edit mask of the first model call
    of each step is kept for the step's inversion-guidance blend. On a flow path it also gives ``x0`` from the
    same call (``eps_x0``), which the solvers need where ``alpha = 0``.
    """

    def __init__(
        self,
        editor: Editor,
        cond: Conditioning,
        uncond: Conditioning | None,
        guidance: float,
        proximal: ProximalGuidance | None = None,
        groups: int = 1,
    ):
        cond, uncond, guidance = editor.family.guidance_inputs(cond, uncond, float(guidance))
        self.editor, self.cond, self.guidance, self.proximal = editor, cond, float(guidance), proximal
        self.gives_x0 = editor.schedule.is_flow
        self.groups = groups
        # w = 1 without proximal guidance is the conditional model: skip the unconditional half.
        plain = uncond is None or (self.guidance == 1.0 and proximal is None)
        self.both = None if plain else Conditioning.cat([uncond, cond])
        self.mask: Tensor | None = None
        self.mask_t: float | None = None

    def set_uncond(self, uncond: Conditioning) -> None:
        """Swap the unconditional branch (null-text inversion's per-step embeddings)."""
        self.both = Conditioning.cat([uncond, self.cond])

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self.both is None:
            return self.editor.unet_eps(x, t, self.cond)
        eps_u, eps_c = self.editor.unet_eps(torch.cat([x, x]), t, self.both).chunk(2)
        if self.proximal is None:
            return eps_u + self.guidance * (eps_c - eps_u)
        eps, mask = self.proximal.guide(eps_u, eps_c, self.guidance, self.groups)
        if self.mask is None:
            self.mask, self.mask_t = mask, float(t)
        return eps

    def eps_x0(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(eps, x0)`` of the guided model from one call (flow paths; guidance is affine, so it guides both)."""
        if self.proximal is not None:
            raise ValueError("proximal guidance is not available on flow-matching models")
        if self.both is None:
            return self.editor.unet_eps_x0(x, t, self.cond)
        (eps_u, eps_c), (x0_u, x0_c) = (p.chunk(2) for p in self.editor.unet_eps_x0(torch.cat([x, x]), t, self.both))
        w = self.guidance
        return eps_u + w * (eps_c - eps_u), x0_u + w * (x0_c - x0_u)


def _check_number(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
        bounds = (
            f" in [{low:g}, {high:g}]"
            if low is not None and high is not None
            else f" >= {low:g}"
            if low is not None
            else ""
        )
        raise ValueError(f"{name} must be a finite number{bounds}, got {value!r}")
    return v


def _prompts(prompts: str | Sequence[str], what: str) -> list[str]:
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise ValueError(f"{what}: give at least one prompt")
    for p in items:
        if not isinstance(p, str):
            raise ValueError(f"{what} must be strings, got {type(p).__name__}")
    return items


class Editor:
    """Invert real images and edit them with text, with any diffinv solver, on any supported model family.

    ``pipe``: a loaded diffusers pipeline of a family in :mod:`diffinv.families` (SD 1.x/2.x, SDXL, SD3, FLUX); its
    adapter (``editor.family``) says how prompts, latents, the denoiser, guidance and the grids work for it (on
    FLUX, guidance-distilled, ``guidance``/``inversion_guidance`` are the embedded guidance values; on SD3 and FLUX
    ``"time"`` is the pipeline scheduler's own shifted grid, :mod:`diffinv.families.flow`).
    ``solver``/``solver_options``/``steps``: the solver; ``spacing``: the grid, ``"auto"`` (default) = the solver's
    reference grid (:func:`diffinv.solvers.resolve_spacing`: ``"time"``, the diffusers sampler's timesteps from
    the model's scheduler config, for DDIM-family and exactly reversible solvers; ``"lambda"``, lambda-uniform, for
    Runge-Kutta/EES), or ``"lambda"``/``"time"``/``"sigma"``; ``editor.spacing`` holds the one used. ``strength`` in
    (0, 1] inverts only part of the way (partial inversion, as diffusers' img2img: the last ``int(steps * strength)``
    steps of the time grid, or ``round(steps * strength)`` steps from timestep ``strength * T``). ``guidance``:
    editing CFG scale (default 3, or 7.5 with NPI);
    ``inversion_guidance``: CFG scale while inverting (default: ``guidance``; ignored by NPI);
    ``negative_prompt``: the unconditional prompt (``""``). ``smoothing``: any of ``"npi"``,
    ``"proximal"``, ``"smooth-lora"`` (those the family supports); ``proximal``: :class:`ProximalGuidance` options;
    ``lora``/``lora_scale``/``lora_merge``: the Smooth-Diffusion LoRA source, strength, and whether it is
    merged into the UNet's weights (default) or applied by forward hooks (``editor.lora_hooks.remove()`` undoes it).
    ``allow_pickle``: accept a pickled LoRA checkpoint (loaded as tensors only); default: safetensors only.
    ``dtype``/``device``: move the pipeline (under ``offload``, ``device`` is where the models run);
    ``solver_dtype``: the solver state's dtype (it stays on the execution device).
    ``offload`` (``"model"``/``"sequential"``), ``vae_tiling``, ``vae_slicing``, ``compile`` (True or a
    ``torch.compile`` mode): memory and speed options through diffusers' and torch's own mechanisms
    (:mod:`diffinv.runtime`).
    ``size``: ``(height, width)`` of the model input (default: the model's native size) and ``resize``
    how images are fitted to it (:mod:`diffinv.images`). ``progress``: tqdm bars per phase.
    """

    def __init__(
        self,
        pipe: Any,
        solver: str | Solver = "ees27",
        steps: int = 50,
        spacing: str = "auto",
        guidance: float | None = None,
        inversion_guidance: float | None = None,
        negative_prompt: str = "",
        smoothing: str | Sequence[str] | None = (),
        proximal: ProximalGuidance | dict[str, Any] | None = None,
        lora: str | Path | dict[str, Tensor] | None = None,
        lora_scale: float = 1.0,
        lora_merge: bool = True,
        allow_pickle: bool = False,
        strength: float = 1.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        solver_dtype: torch.dtype = torch.float32,
        size: tuple[int, int] | None = None,
        resize: str = "crop",
        progress: bool = True,
        solver_options: dict[str, Any] | None = None,
        offload: str | None = None,
        vae_tiling: bool = False,
        vae_slicing: bool = False,
        compile: bool | str = False,
    ):
        check_options(offload, compile)
        for part in ("vae", "scheduler", "encode_prompt"):
            if getattr(pipe, part, None) is None:
                raise ValueError(f"pipe must be a diffusers text-to-image pipeline; it has no {part}")
        self.pipe = pipe
        if offload is not None and dtype is not None:
            pipe.to(dtype=dtype)  # offload places the models itself
        elif device is not None or dtype is not None:
            pipe.to(device=device, dtype=dtype)
        self.family = family_of(pipe)
        self.vae = self.family.vae
        if solver_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"solver_dtype must be torch.float32 or torch.float64, got {solver_dtype}")
        self.solver_dtype = solver_dtype
        self.schedule = self.family.schedule
        self.prediction_type = self.family.prediction_type
        self.solver = get_solver(solver, **(solver_options or {}))

        self.smoothing = parse_smoothing(smoothing)
        if lora is not None and "smooth-lora" not in self.smoothing:
            self.smoothing = parse_smoothing([*self.smoothing, "smooth-lora"])
        unsupported = [s for s in self.smoothing if s not in self.family.smoothing]
        if unsupported:
            allowed = ", ".join(self.family.smoothing) or "none"
            raise ValueError(
                f"smoothing {', '.join(unsupported)} does not apply to {self.family.name} models (supported: {allowed})"
            )
        self.npi = "npi" in self.smoothing
        if isinstance(proximal, dict):
            proximal = ProximalGuidance(**proximal)
        if proximal is not None and not isinstance(proximal, ProximalGuidance):
            raise ValueError(f"proximal must be a ProximalGuidance or a dict of its options, got {proximal!r}")
        self.proximal = (proximal or ProximalGuidance()) if "proximal" in self.smoothing else None

        default_w = DEFAULT_NPI_GUIDANCE if self.npi else DEFAULT_GUIDANCE
        self.guidance = _check_number("guidance", default_w if guidance is None else guidance, 0.0)
        self.inversion_guidance = _check_number(
            "inversion_guidance", self.guidance if inversion_guidance is None else inversion_guidance, 0.0
        )
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        if negative_prompt and not self.family.true_cfg:
            raise ValueError(
                f"{self.family.name} models are guidance-distilled (guidance is a model input, no unconditional"
                " branch): a negative prompt does not apply"
            )
        self.negative_prompt = negative_prompt
        self.strength = _check_number("strength", strength, 0.0, 1.0)
        if self.strength == 0.0:
            raise ValueError("strength must be in (0, 1], got 0")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        multiple = self.family.size_multiple
        self.size = self.family.native_size if size is None else (int(size[0]), int(size[1]))
        if min(self.size) < 1 or self.size[0] % multiple or self.size[1] % multiple:
            raise ValueError(f"size must be positive multiples of {multiple} (height, width), got {size!r}")
        self.steps, self.spacing = steps, resolve_spacing(self.solver, spacing)
        self.timesteps = self.family.timesteps(steps, self.spacing, self.strength, self.size)
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
        self.resize, self.progress = resize, progress

        self.lora_layers: list[str] = []
        self.lora_hooks = None
        self.control: PromptToPrompt | None = None  # the last edit's control (diagnostics, source branch)
        self.lora_scale = _check_number("lora_scale", lora_scale)
        if "smooth-lora" in self.smoothing:
            source = SMOOTH_LORA_ID if lora is None else lora
            applied = load_lora(self.unet, source, self.lora_scale, merge=lora_merge, allow_pickle=allow_pickle)
            self.lora_hooks = None if isinstance(applied, list) else applied
            self.lora_layers = applied if isinstance(applied, list) else applied.layers
        self.offload, self.compile = offload, compile
        configure(pipe, self.unet, device, offload, vae_tiling, vae_slicing, compile)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = DEFAULT_MODEL,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        variant: str | None = None,
        allow_pickle: bool = False,
        **editor_options: Any,
    ) -> Editor:
        """Load a pipeline (hub id or local folder) of a supported family and wrap it.

        The family comes from ``model_index.json``'s ``_class_name``. Defaults: ``device`` CUDA
        when available, else CPU; ``dtype`` the family's on CUDA (float16; bfloat16 for FLUX), float32 elsewhere.
        Weights load from safetensors only, unless ``allow_pickle`` (then diffusers may fall back to ``.bin`` files,
        which it reads with ``torch.load(weights_only=True)``; a pickled LoRA is accepted as well).
        """
        check_device(device)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        family = family_for_model(model)
        if dtype is None:
            dtype = family.cuda_dtype if torch.device(device).type == "cuda" else torch.float32
        kwargs: dict[str, Any] = {"torch_dtype": dtype, "use_safetensors": None if allow_pickle else True}
        if variant is not None:
            kwargs["variant"] = variant
        kwargs.update(family.load_options)
        try:
            pipe = family.pipeline_class().from_pretrained(str(model), **kwargs)
        except OSError as err:  # a missing weights file (diffusers' EnvironmentError)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            hint = "; if it has only pickled (.bin) weights and you trust it: allow_pickle=True (--allow-pickle)"
            raise ValueError(f"cannot load model {model}: {first}{'' if allow_pickle else hint}") from None
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, device=device, allow_pickle=allow_pickle, **editor_options)

    # -- the model -----------------------------------------------------------------------------
    @property
    def unet(self) -> torch.nn.Module:
        """The denoising network (a UNet for SD/SDXL, a transformer for SD3/FLUX)."""
        return self.family.denoiser

    @property
    def is_xl(self) -> bool:
        return self.family.name == "sdxl"

    @property
    def device(self) -> torch.device:
        """Where the models compute and the solver state lives."""
        return self.family.execution_device

    def unet_eps(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The denoiser's noise prediction for batch ``x`` (solver dtype) under ``cond``, in ``x``'s dtype."""
        out = self.family.denoise(x, t, cond)
        if self.prediction_type == "epsilon":
            return out
        return as_eps_model(lambda *_: out, self.schedule, self.prediction_type)(x, t)

    def unet_eps_x0(self, x: Tensor, t: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor]:
        """``(eps, x0)`` of a velocity-predicting denoiser from one call (finite at both ends of a flow path)."""
        out = self.family.denoise(x, t, cond)
        return FlowEpsModel(lambda *_: out, self.schedule).eps_x0(x, t)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Text conditioning of ``prompts`` at the editor's image size; PIE-Bench's ``[ ]`` edit markers are
        annotations (they pick P2P's blend words), never encoded."""
        return self.family.encode_prompts([strip_markers(p) for p in prompts], self.size)

    def eps_model(self, prompts: str | Sequence[str], guidance: float | None = None) -> EpsModel:
        """The guided ``eps(x, t)`` for ``prompts`` with the negative prompt as unconditional branch.

        For text-to-image sampling with any solver: ``diffinv.generate(editor.eps_model(p), noise,
        editor.schedule, solver=...)``, best inside ``torch.inference_mode()``.
        """
        items = _prompts(prompts, "prompts")
        cond = self.encode_prompts(items)
        uncond = self.encode_prompts([self.negative_prompt]).index([0] * len(items))
        w = self.guidance if guidance is None else _check_number("guidance", guidance, 0.0)
        return _GuidedEps(self, cond, uncond, w)

    def guided_eps(self, cond: Conditioning, uncond: Conditioning | None, guidance: float) -> EpsModel:
        """The CFG-guided ``eps(x, t)`` for prepared conditionings (``uncond`` ``None``: conditional only)."""
        return _GuidedEps(self, cond, uncond, guidance)

    # -- images <-> latents ----------------------------------------------------------------------
    def encode_images(self, images: Sequence[Image.Image], generator: torch.Generator | None = None) -> Tensor:
        """Clean latents (solver dtype) of RGB images: the VAE posterior mean, or a sample with ``generator``."""
        with torch.inference_mode():
            return self.family.encode_images(pil_to_tensor(images), self.solver_dtype, generator)

    def decode_latents(self, latents: Tensor) -> list[Image.Image]:
        """RGB images of clean latents (decoded one at a time to bound memory)."""
        with torch.inference_mode():
            lat = latents.to(self.device, self.solver_dtype)
            out = []
            for row in lat.split(1):
                out.extend(tensor_to_pil(self.family.decode_latents(row)))
            return out

    def load_images(self, images: ImageLike | Sequence[ImageLike]) -> list[Image.Image]:
        """Images (path, PIL, array, or a list of them) as RGB at the editor's size."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("give at least one image")
        return [load_image(im, self.size, self.resize) for im in items]

    # -- invert / edit / reconstruct -------------------------------------------------------------
    def invert(
        self,
        image: ImageLike | Sequence[ImageLike],
        prompt: str | Sequence[str],
        generator: torch.Generator | None = None,
        method: str = "plain",
        **method_options: Any,
    ) -> EditInversion:
        """Invert image(s) described by ``prompt`` (one per image, or one for all) to noise.

        ``generator``: sample the VAE posterior with it (default: its mean, fully deterministic). ``method``:
        ``"plain"`` (the solver's inversion at ``inversion_guidance``), ``"null-text"`` or ``"direct"``
        (:mod:`diffinv.inversions`; options ``inner_steps``, ``epsilon``, ``lr`` for null-text).
        """
        pil = self.load_images(image)
        latent = self.encode_images(pil, generator)
        inv = self.invert_latent(
            latent, _expand(_prompts(prompt, "prompt"), len(pil), "prompts"), method=method, **method_options
        )
        inv.images = pil
        return inv

    def invert_latent(
        self, latent: Tensor, prompt: str | Sequence[str], method: str = "plain", **method_options: Any
    ) -> EditInversion:
        """Invert clean latents ``(N, C, h, w)`` (VAE space, scaled) with their source prompts."""
        check_method(method, self.solver, self.smoothing)
        if method != "plain":
            return self._pivot_inversion(latent, prompt, method, **method_options)
        if method_options:
            raise ValueError(f"inversion options {', '.join(sorted(method_options))} need method 'null-text'")
        with torch.inference_mode(), self.family.placed():
            if not isinstance(latent, Tensor) or latent.dim() != 4:
                raise ValueError(f"latent must be a (N, C, h, w) tensor, got {getattr(latent, 'shape', latent)!r}")
            latent = latent.to(self.device, self.solver_dtype)
            prompts = _expand(_prompts(prompt, "prompt"), latent.shape[0], "prompts")
            cond = self.encode_prompts(prompts)
            if self.npi:  # NPI: the conditional source prompt alone, no CFG
                uncond, w = None, 1.0
            else:
                uncond, w = (
                    self.encode_prompts([self.negative_prompt]).index([0] * len(prompts)),
                    self.inversion_guidance,
                )
            model = _GuidedEps(self, cond, uncond, w)
            trajectory: dict[int, dict[str, Tensor]] | None = None
            callback = None
            if self.proximal is not None:  # inversion guidance needs x* at every grid index
                trajectory = {len(self.timesteps) - 1: {"x": latent.clone()}}

                def callback(k: int, t: float, state: State) -> None:
                    trajectory[k] = {n: v.clone() for n, v in state.tensors().items()}

            inv = invert(
                model,
                latent,
                self.schedule,
                solver=self.solver,
                timesteps=self.timesteps,
                callback=callback,
                progress="invert" if self.progress else False,
            )
            return EditInversion(
                inv.state,
                inv.grid,
                inv.solver,
                inv.dtype,
                inv.nfe,
                prompts=prompts,
                cond=cond,
                uncond=uncond,
                guidance=w,
                source=latent,
                trajectory=trajectory,
            )

    def _pivot_inversion(
        self, latent: Tensor, prompt: str | Sequence[str], method: str, **options: Any
    ) -> EditInversion:
        """Null-text inversion or DirectInversion (:mod:`diffinv.inversions`): a pivot at guidance 1, then the
        per-step embeddings or differences that make the guided (``guidance``) source branch land on it."""
        if method == "null-text" and not self.family.true_cfg:
            raise ValueError(
                f"null-text inversion tunes the unconditional branch of classifier-free guidance; {self.family.name}"
                " models are guidance-distilled and have none"
            )
        unknown = sorted(set(options) - ({"inner_steps", "epsilon", "lr"} if method == "null-text" else set()))
        if unknown:
            accepted = "null-text takes inner_steps, epsilon, lr"
            raise ValueError(f"unknown {method} inversion option {unknown[0]!r} ({accepted})")
        with torch.inference_mode(), self.family.placed():
            if not isinstance(latent, Tensor) or latent.dim() != 4:
                raise ValueError(f"latent must be a (N, C, h, w) tensor, got {getattr(latent, 'shape', latent)!r}")
            latent = latent.to(self.device, self.solver_dtype)
            prompts = _expand(_prompts(prompt, "prompt"), latent.shape[0], "prompts")
            cond = self.encode_prompts(prompts)
            uncond = self.encode_prompts([self.negative_prompt]).index([0] * len(prompts))
            progress = "pivot" if self.progress else False
            inv, pivot = pivot_inversion(
                _GuidedEps(self, cond, None, 1.0), latent, self.schedule, self.solver, self.timesteps, progress
            )
            result = EditInversion(
                inv.state,
                inv.grid,
                inv.solver,
                inv.dtype,
                inv.nfe,
                prompts=prompts,
                cond=cond,
                uncond=uncond,
                guidance=self.guidance,
                source=latent,
                method=method,
            )
            if method == "direct":
                model = _GuidedEps(self, cond, uncond, self.guidance)
                result.offsets = direct_offsets(model, inv, pivot)
                return result
        with self.family.placed():  # null-text: gradients through the UNet (inversions.py turns them on)
            result.null_embeddings = null_text_embeddings(
                self.unet_eps,
                cond,
                uncond,
                self.guidance,
                self.solver,
                inv.grid,
                pivot,
                progress=self.progress,
                **options,
            )
        return result

    def edit(
        self,
        inv: EditInversion,
        targets: str | Sequence[str] | Sequence[Sequence[str]],
        guidance: float | None = None,
        output_type: str = "pil",
        control: str | PromptToPrompt | None = None,
        **p2p_options: Any,
    ) -> list[Image.Image] | Tensor:
        """Generate every inverted image under every target prompt, in one batched pass.

        Returns ``images * targets`` results, image-major (image 0 with each target, then image 1, ...).
        ``targets``: prompts for every image, or one list per image (as many lists as images, each as long):
        image ``i`` then gets ``targets[i]`` only (a batch of different images, each with its own edit).
        ``control="p2p"``: Prompt-to-Prompt (:mod:`diffinv.controls.p2p`; ``p2p_options`` are
        :class:`~diffinv.controls.P2POptions`): a source branch with the source prompt runs in the same batch and
        its attention is injected into the targets; ``editor.control`` then holds the control (its
        ``source_result`` is the source branch's latent). ``[ ]`` markers in the prompts pick the blend words
        when ``blend_words`` is not given. A direct inversion's differences go to the source branch.
        """
        if control not in CONTROLS and not isinstance(control, PromptToPrompt):
            raise ValueError(f"unknown control {control!r}; choose p2p or none")
        if p2p_options and control is None:
            raise ValueError(f"options {', '.join(sorted(p2p_options))} need control='p2p'")
        if control is not None and "p2p" not in self.family.controls:
            raise ValueError(f"control p2p does not apply to {self.family.name} models (it needs a UNet)")
        with torch.inference_mode(), self.family.placed():
            _check_inversion(inv)
            n = len(inv.cond)
            per_image = _per_image_targets(targets, n)
            items = _prompts(targets, "targets") if per_image is None else per_image[0]
            p2p = control if isinstance(control, PromptToPrompt) else None
            if per_image is not None and control is not None:
                raise ValueError("per-image targets do not combine with control p2p: edit those images one by one")
            if control == "p2p":
                steps = len(self.timesteps) - 1
                p2p = PromptToPrompt(inv.prompts, items, self.pipe.tokenizer, steps, P2POptions.from_dict(p2p_options))
            if per_image is not None:
                k = len(items)
                cond = self.encode_prompts([t for row in per_image for t in row])
            elif p2p is None:
                k = len(items)
                cond = self.encode_prompts(items).index([j for _ in range(n) for j in range(k)])
            else:  # per image: a source branch with its own source prompt, then the targets
                k = p2p.group
                encoded = self.encode_prompts([*p2p.source_prompts, *p2p.target_prompts])
                cond = encoded.index([j for i in range(n) for j in [i, *range(n, n + k - 1)]])
            rows = [i for i in range(n) for _ in range(k)]
            if self.npi:  # NPI: the source prompt replaces the null prompt
                uncond = inv.cond.index(rows)
            else:
                uncond = self.encode_prompts([self.negative_prompt]).index([0] * (n * k))
            w = self.guidance if guidance is None else _check_number("guidance", guidance, 0.0)
            model = _GuidedEps(self, cond, uncond, w, self.proximal, groups=n)
            callbacks = []
            if self.proximal is not None:
                callbacks.append(self._inversion_guidance(model, inv, rows))
            if inv.offsets is not None and p2p is not None:
                callbacks.append(DirectOffsets(inv.offsets.index_select(1, _rows(inv, range(n)))).callback(group=k))
            if p2p is not None:
                callbacks.append(p2p.callback)
            callbacks += self._null_text(model, inv, rows)
            previous = p2p.install(self.unet) if p2p is not None else None
            try:
                x = generate(
                    model,
                    _replicate(inv, rows),
                    callback=_chain(callbacks),
                    progress="edit" if self.progress else False,
                )
            finally:
                if previous is not None:
                    self.unet.set_attn_processor(previous)
            self.control = p2p
            if p2p is not None:
                x = x.view(n, k, *x.shape[1:])[:, 1:].flatten(0, 1)
            return self._output(x, output_type)

    def reconstruct(self, inv: EditInversion, output_type: str = "pil") -> list[Image.Image] | Tensor:
        """Generate back with the inversion's own field (source prompt, inversion guidance): the round trip.

        Null-text: with the per-step embeddings; direct: the source branch with its differences (ends on the
        source latent)."""
        with torch.inference_mode(), self.family.placed():
            _check_inversion(inv)
            model = _GuidedEps(self, inv.cond, inv.uncond, inv.guidance)
            rows = list(range(len(inv.cond)))
            callbacks = self._null_text(model, inv, rows)
            if inv.offsets is not None:
                callbacks.append(DirectOffsets(inv.offsets).callback(group=1))
            x = generate(model, inv, callback=_chain(callbacks), progress="reconstruct" if self.progress else False)
            return self._output(x, output_type)

    def _null_text(self, model: _GuidedEps, inv: EditInversion, rows: list[int]) -> list[Any]:
        """Null-text inversion: set step 0's embeddings now, and a callback that sets each next step's."""
        emb = inv.null_embeddings
        if emb is None:
            return []
        idx = _rows(inv, rows)
        extra = {k: v.index_select(0, idx.to(v.device)) for k, v in inv.uncond.extra.items()}

        def at(step: int) -> Conditioning:
            return Conditioning(emb[step].index_select(0, idx.to(emb.device)).to(self.device), extra)

        model.set_uncond(at(0))

        def callback(k: int, t: float, state: State) -> None:
            if k < emb.shape[0]:
                model.set_uncond(at(k))

        return [callback]

    def _inversion_guidance(self, model: _GuidedEps, inv: EditInversion, rows: list[int]):
        """Step callback of proximal guidance: outside the edit mask, pull the state to the inversion's."""
        prox, trajectory = self.proximal, inv.trajectory
        if prox is None or trajectory is None:
            raise ValueError("proximal guidance needs an inversion made with proximal smoothing on")
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)

        def callback(k: int, t: float, state: State) -> State | None:
            mask, t_step = model.mask, model.mask_t
            model.mask = model.mask_t = None
            stored = trajectory.get(k)
            if mask is None or t_step is None or stored is None or not prox.active(t_step):
                return None
            tensors = state.tensors()
            new = {}
            for name, star in stored.items():
                value = tensors.get(name)
                if value is not None and value.shape == mask.shape:
                    new[name] = prox.blend(value, star.index_select(0, idx), mask)
            return type(state)(**{**vars(state), **new})

        return callback

    def _output(self, x: Tensor, output_type: str) -> list[Image.Image] | Tensor:
        if output_type == "latent":
            return x
        if output_type == "pil":
            return self.decode_latents(x)
        raise ValueError(f"unknown output_type {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")

    def __repr__(self) -> str:
        smooth = ",".join(self.smoothing) or "none"
        return (
            f"Editor({self.family.name}, solver={self.solver.describe()}, steps={len(self.timesteps) - 1}, "
            f"spacing={self.spacing}, guidance={self.guidance:g}, smoothing={smooth}, size={self.size})"
        )


def _expand(prompts: list[str], n: int, what: str) -> list[str]:
    if len(prompts) == 1:
        return prompts * n
    if len(prompts) != n:
        raise ValueError(f"{what}: give one prompt or one per image ({n}), got {len(prompts)}")
    return prompts


def _per_image_targets(targets: Any, n: int) -> list[list[str]] | None:
    """``targets`` as one prompt list per image when given so (a list of lists), else None (shared targets)."""
    if isinstance(targets, str) or not isinstance(targets, Sequence) or not targets:
        return None
    if not all(isinstance(row, Sequence) and not isinstance(row, str) for row in targets):
        return None
    rows = [_prompts(row, "targets") for row in targets]
    if len(rows) != n or len({len(row) for row in rows}) != 1:
        sizes = ", ".join(str(len(row)) for row in rows)
        raise ValueError(f"per-image targets: give {n} lists (one per image) of equal length, got lengths {sizes}")
    return rows


def _check_inversion(inv: Any) -> None:
    if not isinstance(inv, EditInversion) or inv.cond is None:
        raise ValueError(f"expected the result of Editor.invert, got {type(inv).__name__}")


def _rows(inv: EditInversion, rows: Sequence[int]) -> Tensor:
    return torch.as_tensor(list(rows), dtype=torch.long, device=inv.state.x.device)


def _chain(callbacks: list[Any]) -> Any:
    """One solve-loop callback running ``callbacks`` in order, each seeing the previous one's state."""
    if not callbacks:
        return None

    def run(k: int, t: float, state: State) -> State | None:
        changed = None
        for cb in callbacks:
            new = cb(k, t, state if changed is None else changed)
            changed = changed if new is None else new
        return changed

    return run


def _replicate(inv: EditInversion, rows: list[int]) -> Inversion:
    """The inversion with every state tensor's batch rows picked by ``rows`` (one per edit)."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    tensors = {n: v.index_select(0, idx.to(v.device)) for n, v in inv.state.tensors().items()}
    state = type(inv.state)(**{**vars(inv.state), **tensors})
    return Inversion(state, inv.grid, inv.solver, inv.dtype, inv.nfe)
