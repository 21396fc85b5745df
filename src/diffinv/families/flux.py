"""FLUX.1: guidance-distilled rectified flow, CLIP (pooled) + T5 text, a transformer on packed 2x2 latent patches.

What guidance means here: FLUX.1-dev was distilled from classifier-free guidance into a guidance *embedding*, an
input of the transformer (``guidance``). diffinv's ``guidance`` is that embedded value in the edit (and
reconstruction) and ``inversion_guidance`` the embedded value while inverting (default: the same, so that an
exactly reversible solver reconstructs exactly); every model evaluation is one transformer call with the prompt,
there is no unconditional branch and no negative prompt. True CFG on top (diffusers' ``true_cfg_scale``) is not
offered: it doubles the cost and is not what the model was distilled for. FLUX.1-schnell has no guidance
embedding; there the guidance values change nothing.

Latents stay ``(N, C, h, w)`` for the solvers; :meth:`Flux.denoise` packs them into the transformer's
``(N, h/2 * w/2, 4C)`` tokens with their image ids, and unpacks its output, as ``FluxPipeline`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .base import Conditioning
from .flow import FlowFamily

__all__ = ["Flux", "pack_latents", "unpack_latents"]


def pack_latents(x: Tensor) -> Tensor:
    """``(N, C, h, w)`` -> ``(N, h/2 * w/2, 4C)``: 2x2 patches as tokens (``FluxPipeline._pack_latents``)."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack_latents` for latents of height ``h`` and width ``w``."""
    n, _, d = tokens.shape
    return tokens.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, d // 4, h, w)


class Flux(FlowFamily):
    """``FluxPipeline`` models (FLUX.1-dev, -schnell): embedded guidance, packed latents, image/text position ids,
    and the resolution-dependent shift of the grid (``mu`` from the image's token count, as the pipeline)."""

    name = "flux"
    pipelines = ("FluxPipeline", "FluxImg2ImgPipeline")
    true_cfg = False
    cuda_dtype = torch.bfloat16  # FLUX's activations overflow float16, as black-forest-labs' examples note

    def __init__(self, pipe: Any):
        super().__init__(pipe)
        self._ids: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "FluxTransformer2DModel"

    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.transformer

    @property
    def native_size(self) -> tuple[int, int]:
        side = int(getattr(self.pipe, "default_sample_size", 128)) * self.vae_scale
        return side, side

    @property
    def size_multiple(self) -> int:
        return self.vae_scale * 2

    @property
    def embeds_guidance(self) -> bool:
        """Whether the transformer takes a guidance embedding (FLUX.1-dev: yes, FLUX.1-schnell: no)."""
        return bool(self.denoiser.config.guidance_embeds)

    def guidance_inputs(
        self, cond: Conditioning, uncond: Conditioning | None, guidance: float
    ) -> tuple[Conditioning, Conditioning | None, float]:
        """The guidance scale becomes the ``guidance`` embedding input of every row; no unconditional branch."""
        scale = torch.full((len(cond),), float(guidance), dtype=cond.hidden.dtype, device=cond.hidden.device)
        return Conditioning(cond.hidden, {**cond.extra, "guidance": scale}), None, 1.0

    def scheduler_options(self, steps: int, size: tuple[int, int]) -> dict[str, Any]:
        """``FluxPipeline``'s sigmas ``linspace(1, 1/steps, steps)`` and ``mu = calculate_shift(tokens)``."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipe.scheduler.config
        tokens = (size[0] // self.size_multiple) * (size[1] // self.size_multiple)
        mu = calculate_shift(
            tokens,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / steps, steps)
        return {"sigmas": sigmas, "mu": mu} if cfg.get("use_dynamic_shifting", False) else {"sigmas": sigmas}

    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        """T5's text states and CLIP's pooled embedding, from the pipeline's own ``encode_prompt``."""
        device, dtype = self.placement
        hidden, pooled, _ = self.pipe.encode_prompt(list(prompts), None, device=device, num_images_per_prompt=1)
        return Conditioning(hidden.to(dtype), {"pooled": pooled.to(dtype)})

    def denoise(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        device, dtype = self.placement
        n, _, h, w = x.shape
        tdtype = torch.float64 if dtype == torch.float64 else torch.float32
        guidance = cond.extra.get("guidance")
        if guidance is not None and self.embeds_guidance:
            guidance = guidance.to(device, tdtype)
        else:
            guidance = None
        out = self.denoiser(
            hidden_states=pack_latents(x.to(device, dtype)),
            timestep=t.to(device, tdtype).expand(n) / 1000,
            guidance=guidance,
            pooled_projections=cond.extra["pooled"],
            encoder_hidden_states=cond.hidden,
            **self.position_ids(h, w, cond.hidden.shape[1], device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).to(x.dtype)

    def position_ids(
        self, h: int, w: int, text_len: int, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Tensor]:
        """The transformer's ``img_ids`` (row, column of each 2x2 patch) and ``txt_ids`` (zeros), as the pipeline
        makes them; kept per shape, as every solver stage asks for the same ones."""
        key = (h, w, text_len, device, dtype)
        if key not in self._ids:
            img = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)
            self._ids[key] = (img, torch.zeros(text_len, 3, device=device, dtype=dtype))
        img, txt = self._ids[key]
        return {"img_ids": img, "txt_ids": txt}
