"""SDXL: two CLIP text encoders, pooled text embeddings and micro-conditioning time ids for the UNet."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import Conditioning
from .sd import StableDiffusion

__all__ = ["StableDiffusionXL"]


class StableDiffusionXL(StableDiffusion):
    """SDXL base pipelines (the refiner, which has no ``text_encoder_2``... is refused)."""

    name = "sdxl"
    pipelines = ("StableDiffusionXLPipeline",)
    load_options = {}  # noqa: RUF012 - no safety checker to switch off

    def __init__(self, pipe: Any):
        if getattr(pipe, "text_encoder_2", None) is None:
            raise ValueError("SDXL pipelines without text_encoder_2 (e.g. the refiner) are not supported")
        super().__init__(pipe)
        if self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(torch.float32)  # the SDXL VAE overflows in fp16, as diffusers also upcasts it

    @classmethod
    def claims(cls, class_name: str) -> bool:
        return class_name.startswith("StableDiffusionXL")

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        unet = getattr(pipe, "unet", None)
        return unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time"

    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        """Both encoders' states, the pooled embedding and the time ids ``(h, w, 0, 0, h, w)`` (original size,
        crop top-left, target size); ``""`` gives zeros where the model asks for it (``force_zeros_for_empty_prompt``),
        as diffusers does for its negative prompt."""
        prompts = list(prompts)
        device, dtype = self.placement
        hidden, _, pooled, _ = self.pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        if getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            empty = torch.tensor([p == "" for p in prompts], device=device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        h, w = size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=device, dtype=dtype).expand(len(prompts), 6)
        return Conditioning(hidden.to(dtype), {"pooled": pooled.to(dtype), "time_ids": time_ids})

    def unet_inputs(self, cond: Conditioning) -> dict[str, Any]:
        added = {"text_embeds": cond.extra["pooled"], "time_ids": cond.extra["time_ids"]}
        return {"encoder_hidden_states": cond.hidden, "added_cond_kwargs": added}
