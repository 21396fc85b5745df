"""What a model family is to the Editor: prompts -> conditioning, images <-> latents, the denoiser call, the schedule.

A :class:`ModelFamily` wraps one loaded diffusers pipeline and answers exactly the questions in which model
families differ (reference/design.md): how prompts become conditioning, how images become latents and back, how
the denoiser is called at ``(x, t, cond)``, which prediction type it returns, which noise schedule it follows and
on which grid its reference sampler steps. Everything else (guidance, solvers, editing controls) is the Editor's
and the solvers'. Adding a family is one module with one subclass, registered in :mod:`diffinv.families`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..runtime import execution_device
from ..schedules import NoiseSchedule, make_grid

__all__ = ["Conditioning", "ModelFamily", "diffusers_timesteps"]


@dataclass
class Conditioning:
    """Text conditioning of a batch: the denoiser's text states plus named extras (pooled embeddings, ids...).

    Every tensor has the batch on its first dimension, so batches are picked and joined row by row.
    """

    hidden: Tensor  # (B, L, D)
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def index(self, rows: Sequence[int] | Tensor) -> Conditioning:
        """The rows ``rows`` (with repetition) as a new batch."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.hidden.device)
        pick = {k: v.index_select(0, idx.to(v.device)) for k, v in self.extra.items()}
        return Conditioning(self.hidden.index_select(0, idx), pick)

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Concatenate batches along the batch dimension."""
        extra = {k: torch.cat([p.extra[k] for p in parts]) for k in parts[0].extra}
        return Conditioning(torch.cat([p.hidden for p in parts]), extra)


def diffusers_timesteps(config: Any, steps: int, strength: float = 1.0) -> Tensor:
    """The DDIM sampler's timesteps for a VP model's scheduler config, generation order, ending at 0.

    What diffusers' ``DDIMScheduler.from_config(config).set_timesteps(steps)`` walks (``timestep_spacing`` and
    ``steps_offset`` from the config: SD 1.5's "leading" + 1 gives 981, 961, ..., 1), then the last step to
    ``alphas_cumprod[0]``, our timestep 0 (diffusers' ``set_alpha_to_one=False``). ``strength < 1`` keeps the
    last ``int(steps * strength)`` steps (at least one), as diffusers' img2img does.
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(dict(config))
    try:
        sched.set_timesteps(steps)
    except ValueError as err:  # more steps than training timesteps
        raise ValueError(f"spacing 'time': {err}") from None
    ts = [float(t) for t in sched.timesteps.tolist()]
    keep = max(1, min(steps, int(steps * strength)))
    ts = ts[len(ts) - keep :]
    return torch.tensor(ts if ts[-1] == 0 else [*ts, 0.0], dtype=torch.float64)


class ModelFamily:
    """One model family's answers, over a loaded pipeline ``pipe``. Subclasses set the class attributes.

    ``pipelines``: the diffusers pipeline class names (``model_index.json``'s ``_class_name``) it loads, the first
    being the class it loads them with; ``smoothing``: the smoothing strategies that apply to it; ``controls``: the
    editing controls (``"p2p"``) that apply to it; ``true_cfg``: whether guidance is classifier-free guidance
    against a negative prompt (False: guidance-distilled, see :meth:`guidance_inputs`); ``cuda_dtype``: the
    model dtype on CUDA when none is asked for; ``load_options``: extra ``from_pretrained`` keywords.
    """

    name: ClassVar[str] = "base"
    pipelines: ClassVar[tuple[str, ...]] = ()
    smoothing: ClassVar[tuple[str, ...]] = ()
    controls: ClassVar[tuple[str, ...]] = ()
    true_cfg: ClassVar[bool] = True
    cuda_dtype: ClassVar[torch.dtype] = torch.float16
    load_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.vae = pipe.vae
        self._placement: tuple[torch.device, torch.dtype] | None = None

    # -- which family ----------------------------------------------------------------------------
    @classmethod
    def claims(cls, class_name: str) -> bool:
        """Whether a model whose ``model_index.json`` names pipeline ``class_name`` is of this family."""
        return class_name in cls.pipelines

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        """Whether the loaded pipeline ``pipe`` is of this family."""
        raise NotImplementedError

    @classmethod
    def pipeline_class(cls) -> type:
        """The diffusers pipeline class that loads this family's models."""
        import diffusers

        return getattr(diffusers, cls.pipelines[0])

    # -- the denoiser ------------------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        """The network called at every solver stage (a UNet or a transformer)."""
        raise NotImplementedError

    @cached_property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule the denoiser was trained on."""
        return NoiseSchedule.from_scheduler(self.pipe.scheduler)

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts, in diffusers' names (``epsilon``, ``v_prediction``, ``sample``, ...)."""
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    def denoise(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The denoiser's raw output for the batch ``x`` at model timestep ``t`` under ``cond``, in ``x``'s dtype."""
        raise NotImplementedError

    @contextmanager
    def placed(self) -> Iterator[None]:
        """Look up the denoiser's device and dtype once for a whole solve instead of on every call:
        diffusers' ``ModelMixin.device``/``.dtype`` walk every submodule (a fifth of a tiny UNet's call)."""
        self._placement = (self.execution_device, self.denoiser.dtype)
        try:
            yield
        finally:
            self._placement = None

    @property
    def placement(self) -> tuple[torch.device, torch.dtype]:
        """``(device, dtype)`` of the denoiser (cached inside :meth:`placed`)."""
        return self._placement or (self.execution_device, self.denoiser.dtype)

    @property
    def execution_device(self) -> torch.device:
        """Where the models compute (the accelerator under CPU offload, where the weights sit otherwise)."""
        return execution_device(self.pipe, self.denoiser)

    def guidance_inputs(
        self, cond: Conditioning, uncond: Conditioning | None, guidance: float
    ) -> tuple[Conditioning, Conditioning | None, float]:
        """``(cond, uncond, cfg_scale)`` of a model evaluation at guidance ``guidance``: classifier-free guidance
        ``eps_u + w (eps_c - eps_u)`` as given; a guidance-distilled family moves the scale into ``cond``."""
        return cond, uncond, guidance

    # -- prompts -----------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        """Conditioning of ``prompts`` for images of ``size`` ``(height, width)``."""
        raise NotImplementedError

    # -- images <-> latents --------------------------------------------------------------------------
    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> tuple[int, int]:
        """The ``(height, width)`` the model was trained at (default: the denoiser's square ``sample_size``)."""
        side = int(self.denoiser.config.sample_size) * self.vae_scale
        return side, side

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this."""
        raise NotImplementedError

    def _latent_norm(
        self, dtype: torch.dtype, device: torch.device
    ) -> tuple[float, Tensor | None, Tensor | None, float]:
        cfg = self.vae.config
        to = {"device": device, "dtype": dtype}
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        mean = None if mean is None else torch.tensor(mean, **to).view(1, -1, 1, 1)
        std = None if std is None else torch.tensor(std, **to).view(1, -1, 1, 1)
        shift = getattr(cfg, "shift_factor", None)
        return float(cfg.scaling_factor), mean, std, 0.0 if shift is None else float(shift)

    def encode_images(self, pixels: Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents in ``dtype`` of images ``pixels`` ``(N, 3, H, W)`` in ``[-1, 1]``: the VAE posterior mean,
        or a sample with ``generator``; ``(z - shift) * scale``, or ``(z - mean) * scale / std`` for VAEs with
        per-channel latent statistics, as diffusers' pipelines normalise them."""
        dist = self.vae.encode(pixels.to(self.execution_device, self.vae.dtype)).latent_dist
        lat = (dist.mean if generator is None else dist.sample(generator)).to(dtype)
        scale, mean, std, shift = self._latent_norm(dtype, lat.device)
        if mean is not None and std is not None:
            return (lat - mean) * scale / std
        return (lat - shift) * scale

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images ``(N, 3, H, W)`` in about ``[-1, 1]`` of scaled latents (the inverse of :meth:`encode_images`)."""
        lat = latents.to(self.execution_device)
        scale, mean, std, shift = self._latent_norm(latents.dtype, lat.device)
        lat = lat * std / scale + mean if mean is not None and std is not None else lat / scale + shift
        return self.vae.decode(lat.to(self.vae.dtype), return_dict=False)[0]

    # -- grids ---------------------------------------------------------------------------------------
    def timesteps(self, steps: int, spacing: str, strength: float = 1.0, size: tuple[int, int] | None = None) -> Tensor:
        """The grid, generation order, for ``steps`` solver steps over the whole range, inversion depth
        ``strength`` and image ``size`` (default: native; the grid may depend on it): ``"time"`` is the family's
        reference sampler grid (VP models: :func:`diffusers_timesteps`); ``"lambda"``/``"sigma"`` are uniform in
        those variables from ``strength * T`` with ``round(steps * strength)`` steps."""
        if spacing == "time":
            return diffusers_timesteps(self.pipe.scheduler.config, steps, strength)
        schedule = self.schedule
        start = None if strength == 1.0 else strength * schedule.T
        return make_grid(schedule, max(1, round(steps * strength)), spacing, start)
