"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, eps- or v-prediction on a DDPM-type schedule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .base import Conditioning, ModelFamily

__all__ = ["StableDiffusion"]


class StableDiffusion(ModelFamily):
    """SD 1.x/2.x pipelines (``StableDiffusionPipeline`` and the pipelines sharing its parts)."""

    name = "sd"
    pipelines = ("StableDiffusionPipeline",)
    smoothing = ("npi", "proximal", "smooth-lora")
    controls = ("p2p",)
    load_options: ClassVar[dict[str, Any]] = {
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }

    @classmethod
    def claims(cls, class_name: str) -> bool:
        # img2img, inpaint, ... pipelines of SD 1.x/2.x carry the same parts; SD3 and SDXL have families of their own
        return class_name.startswith("StableDiffusion") and not class_name.startswith(
            ("StableDiffusionXL", "StableDiffusion3")
        )

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        unet = getattr(pipe, "unet", None)
        return unet is not None and getattr(unet.config, "addition_embed_type", None) != "text_time"

    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.unet

    @property
    def size_multiple(self) -> int:
        return self.vae_scale * 2 ** (len(self.denoiser.config.block_out_channels) - 1)

    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        device, dtype = self.placement
        hidden, _ = self.pipe.encode_prompt(list(prompts), device, 1, False)
        return Conditioning(hidden.to(dtype))

    def unet_inputs(self, cond: Conditioning) -> dict[str, Any]:
        """Keyword arguments of the UNet call besides the latent and the timestep."""
        return {"encoder_hidden_states": cond.hidden}

    def denoise(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        device, dtype = self.placement
        t_in = t.to(device, torch.float64 if dtype == torch.float64 else torch.float32)
        out = self.denoiser(x.to(dtype), t_in, **self.unet_inputs(cond), return_dict=False)[0]
        return out.to(x.dtype)
