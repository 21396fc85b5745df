"""Tiny random diffusers models built from config, for offline tests (see reference/environment.md)."""

from __future__ import annotations

import copy

import torch


def tiny_clip_tokenizer(max_len: int = 77):
    """A byte-level CLIP tokenizer with no merges: 2 specials + 256 chars + 256 "c</w>"."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len)


def tiny_unet(seed: int = 0, sample_size: int = 8, cross_attention_dim: int = 32, dtype=torch.float32):
    """A ~1M-parameter SD-like UNet2DConditionModel with random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
    )
    return unet.to(dtype).eval()


def tiny_unet_eps(unet, context: torch.Tensor, scale: float = 1.0):
    """``eps(x, t)`` of a UNet with a fixed text context; ``scale`` < 1 damps the random output."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ctx = context.to(x.dtype).expand(x.shape[0], *context.shape[1:])
        return scale * unet(x, t, encoder_hidden_states=ctx).sample

    return eps


def sd_ddim_scheduler():
    """SD 1.x's DDIMScheduler as its shipped config sets it up (scaled_linear, no clipping, alpha_bar_0 at the end)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_sd_pipe(seed: int = 0):
    """A tiny StableDiffusionPipeline (64x64 images, 8x8 latents) with random weights."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = tiny_unet(seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    tok = tiny_clip_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tok),
            max_position_embeddings=77,
            projection_dim=32,
        )
    )
    sched = sd_ddim_scheduler()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def float64_copy(module):
    """A float64 deep copy of a torch module (exactness tests run the UNet in float64)."""
    return copy.deepcopy(module).double()


def tiny_sdxl_pipe(seed: int = 0):
    """A tiny StableDiffusionXLPipeline (64x64 images, 8x8 latents, two text encoders) with random weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sd = tiny_sd_pipe(seed)  # reuse its VAE and tokenizer
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + pooled text (projection_dim)
        cross_attention_dim=64,  # hidden sizes of the two text encoders, concatenated
    ).eval()
    config = {
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "vocab_size": len(sd.tokenizer),
        "max_position_embeddings": 77,
        "projection_dim": 32,
        "hidden_act": "gelu",
    }
    torch.manual_seed(seed + 3)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config))
    torch.manual_seed(seed + 4)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=sd.vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=sd.tokenizer,
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=sched,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def damp_unet(unet, time_scale: float = 1e-3, out_scale: float = 0.1):
    """Make a random UNet smooth enough for convergence tests (in place; returns it).

    The sinusoidal timestep embedding turns about once per timestep, so a random UNet oscillates
    in ``t`` far faster than any solver grid resolves; ``time_scale`` slows it down, and
    ``out_scale`` shrinks the output (and with it the Lipschitz constant of the field).
    """
    unet.time_proj.scale = time_scale
    unet.conv_out.weight.data.mul_(out_scale)
    unet.conv_out.bias.data.mul_(out_scale)
    return unet


def tiny_text_sd_pipe(seed: int = 0, text_scale: float = 30.0, time_scale: float = 1e-2, out_scale: float = 0.3):
    """A tiny SD pipeline whose output follows its text embedding (for null-text inversion).

    A random tiny UNet barely responds to its null embedding: cross-attention sits at one resolution and the
    text states are O(1) against Adam's steps of 1e-2. Here every resolution cross-attends, the text encoder's
    output is shrunk by ``text_scale`` and every cross-attention's key/value projections grown by it (the
    encoded prompts act as before, a step of the optimised embedding moves the output ``text_scale`` times
    more), and the UNet is smoothed in time and damped as :func:`damp_unet` does.
    """
    from diffusers import UNet2DConditionModel

    pipe = tiny_sd_pipe(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=32,
        attention_head_dim=8,
    ).eval()
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_k.weight.mul_(text_scale)
                module.to_v.weight.mul_(text_scale)
        norm = pipe.text_encoder.final_layer_norm
        norm.weight.div_(text_scale)
        norm.bias.div_(text_scale)
    damp_unet(unet, time_scale, out_scale)
    pipe.register_modules(unet=unet)
    return pipe
