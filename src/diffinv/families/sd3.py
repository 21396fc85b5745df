"""Stable Diffusion 3 / 3.5: three text encoders (CLIP-L, CLIP-G, T5), a joint (MM-DiT) transformer, true CFG."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import Conditioning
from .flow import FlowFamily

__all__ = ["StableDiffusion3"]


class StableDiffusion3(FlowFamily):
    """``StableDiffusion3Pipeline`` models: velocity prediction on the flow path, classifier-free guidance against
    the negative prompt as in diffusers' pipeline, the scheduler's static shift (3.0 for SD3-medium) in its grid."""

    name = "sd3"
    # the img2img and inpainting pipelines carry the same parts (ControlNet ones do not)
    pipelines = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
    smoothing = ("npi",)  # proximal guidance and the Smooth-Diffusion LoRA are SD 1.x tools

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "SD3Transformer2DModel"

    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.transformer

    @property
    def size_multiple(self) -> int:
        return self.vae_scale * int(self.denoiser.config.patch_size)

    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int]) -> Conditioning:
        """The joint text states (both CLIPs' penultimate states padded to T5's width, then T5's) and the two
        CLIPs' pooled embeddings, from the pipeline's own ``encode_prompt``."""
        device, dtype = self.placement
        hidden, _, pooled, _ = self.pipe.encode_prompt(
            list(prompts), None, None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditioning(hidden.to(dtype), {"pooled": pooled.to(dtype)})

    def denoise(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        device, dtype = self.placement
        t_in = t.to(device, torch.float64 if dtype == torch.float64 else torch.float32).expand(x.shape[0])
        out = self.denoiser(
            hidden_states=x.to(device, dtype),
            timestep=t_in,
            encoder_hidden_states=cond.hidden,
            pooled_projections=cond.extra["pooled"],
            return_dict=False,
        )[0]
        return out.to(x.dtype)
