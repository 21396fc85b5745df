"""Throughput at benchmark scale: ``python benchmarks/gpu.py`` (on a GPU; on a CPU it runs the tiny models).

Builds full-size SD 1.5, SDXL and SD3-medium pipelines and a FLUX.1-dev pipeline with a reduced number of transformer
blocks from their published configs with random weights (no download: the numbers are about speed and memory, not
pictures) and measures, per solver:

* **overhead ratio** = wall / (model calls x median isolated model call), for invert + edit + reconstruct of one
  image in latent space (the solver, grid, guidance and batching cost on top of the network);
* **images/s** at batch B = 1, 2, 4, 8 (B images inverted, edited and reconstructed together), eager and with
  ``compile`` (:mod:`diffinv.runtime`); the first compiled run's extra time is reported apart;
* **peak GPU memory** of those runs, and of SDXL under ``offload="model"``;
* ``Editor.edit`` (DDIM) against the plain diffusers pipeline at equal model calls;
* **bench images/s**: ``run_bench`` end to end (VAE, PNGs, records, PSNR/MSE/SSIM) over a synthetic PIE-Bench
  folder at ``--batch-size`` B = 1, 2, 4, 8, and how far each B's records are from B = 1's (float round-off).

It writes (or replaces) its own section of BENCHMARKS.md, titled with the device's name; ``make bench``
keeps that section when it rewrites the rest. On a CPU (no ``--device cuda``) it runs the tests' tiny pipeline
so the script itself is exercised everywhere. SD3's T5 is left out (the pipeline then feeds zeros in its place) and
FLUX's T5 has one layer of T5-XXL's width: text encoding runs once per prompt, outside the solver loop.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from common import ModuleTimer, _tests_tiny, fmt_s, latent, machine_info, md_table

from diffinv.editor import Editor
from diffinv.families.flux import pack_latents

SOLVERS = ("ddim", "dpmpp_2m", "ees27", "rk4", "edict", "bdia", "belm", "rex", "reversible_heun")
BATCHES = (1, 2, 4, 8)
SOURCE, TARGET = "a photo of a cat", "a photo of a dog"
BEGIN, END = "<!-- gpu.py section: begin -->", "<!-- gpu.py section: end -->"


# -- full-size pipelines from published configs, random weights ------------------------------------------------


def _clip(hidden: int, layers: int, heads: int, act: str, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,  # the tests' in-memory tokenizer's ids (no tokenizer files offline)
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(scaling: float, sample_size: int, channels: int = 4, shift: float | None = None) -> Any:
    from diffusers import AutoencoderKL

    flow = {} if shift is None else {"shift_factor": shift, "use_quant_conv": False, "use_post_quant_conv": False}
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=channels,
        sample_size=sample_size,
        scaling_factor=scaling,
        **flow,
    )


def sd15_pipe() -> Any:
    """SD 1.5's architecture (UNet 860 M, CLIP ViT-L text encoder, the KL VAE), random weights."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tiny = _tests_tiny()
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    return StableDiffusionPipeline(
        vae=_vae(0.18215, 512),
        text_encoder=_clip(768, 12, 12, "quick_gelu", False),
        tokenizer=tiny.tiny_clip_tokenizer(),
        unet=unet,
        scheduler=tiny.sd_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipe() -> Any:
    """SDXL base's architecture (UNet 2.6 B, CLIP ViT-L + OpenCLIP ViT-bigG text encoders, the VAE), random weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tiny = _tests_tiny()
    unet = UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=_vae(0.13025, 1024),
        text_encoder=_clip(768, 12, 12, "quick_gelu", False),
        text_encoder_2=_clip(1280, 32, 20, "gelu", True),
        tokenizer=tiny.tiny_clip_tokenizer(),
        tokenizer_2=tiny.tiny_clip_tokenizer(),
        unet=unet,
        scheduler=sched,
    )


# FLUX.1-dev has 19 double-stream and 38 single-stream blocks (12 B parameters); a third of each keeps the random
# initialisation quick and the per-block cost the same.
FLUX_BLOCKS = (6, 12)


def sd3_pipe() -> Any:
    """SD3-medium's architecture (MM-DiT 2 B, CLIP-L + CLIP-G text encoders, the 16-channel VAE), random weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tiny = _tests_tiny()
    transformer = SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=192,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(1.5305, 1024, 16, 0.0609),
        text_encoder=_clip(768, 12, 12, "quick_gelu", True),
        tokenizer=tiny.tiny_clip_tokenizer(),
        text_encoder_2=_clip(1280, 32, 20, "gelu", True),
        tokenizer_2=tiny.tiny_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def flux_pipe() -> Any:
    """FLUX.1-dev's architecture with :data:`FLUX_BLOCKS` transformer blocks (guidance embedding, packed latents,
    CLIP-L pooled text, a one-layer T5 of T5-XXL's width, the 16-channel VAE), random weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tiny = _tests_tiny()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=FLUX_BLOCKS[0],
        num_single_layers=FLUX_BLOCKS[1],
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    t5_tok = tiny.tiny_t5_tokenizer(512)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=4096,
            d_ff=10240,
            d_kv=64,
            num_heads=64,
            num_layers=1,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(0.3611, 1024, 16, 0.1159),
        text_encoder=_clip(768, 12, 12, "quick_gelu", False),
        tokenizer=tiny.tiny_clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


# -- measurements --------------------------------------------------------------------------------------------


def pipe_latent(pipe: Any, size: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A clean latent of ``batch`` images with ``size`` latent cells a side and the pipeline's channel count."""
    return latent(size, batch, seed=seed, channels=int(pipe.vae.config.latent_channels))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a (CPU)"


def _round_trip(editor: Editor, x0: torch.Tensor) -> int:
    """Invert, edit and reconstruct the latents ``x0`` (one target each); returns the inversion's model calls."""
    inv = editor.invert_latent(x0, SOURCE)
    editor.edit(inv, TARGET, output_type="latent")
    editor.reconstruct(inv, output_type="latent")
    return inv.nfe


def _timed(editor: Editor, x0: torch.Tensor, repeat: int) -> tuple[list[float], int]:
    walls, nfe = [], 0
    for _ in range(repeat):
        _sync(editor.device)
        start = time.perf_counter()
        nfe = _round_trip(editor, x0)
        _sync(editor.device)
        walls.append(time.perf_counter() - start)
    return walls, nfe


def _isolated_call(editor: Editor, x: torch.Tensor, repeat: int) -> float:
    """Median seconds of one guided model call (CFG batch 2 x images), timed alone."""
    model = editor.eps_model([SOURCE] * x.shape[0])
    t = torch.full((x.shape[0],), 500.0, dtype=torch.float64, device=x.device)
    with torch.inference_mode(), editor.family.placed():
        model(x, t)
        samples = []
        for _ in range(repeat):
            _sync(editor.device)
            start = time.perf_counter()
            model(x, t)
            _sync(editor.device)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def overhead_rows(pipe: Any, size: int, steps: int, solvers: tuple[str, ...], repeat: int) -> list[list[Any]]:
    rows = []
    base = Editor(pipe, steps=steps, progress=False)
    x0 = pipe_latent(pipe, size).to(base.device)
    call = _isolated_call(base, x0, max(5, repeat * 3))
    for solver in solvers:
        editor = Editor(pipe, solver=solver, steps=steps, progress=False)
        timer = ModuleTimer(editor.unet)
        _round_trip(editor, x0)  # warm-up
        timer.seconds = 0.0
        walls, nfe = _timed(editor, x0, repeat)
        inside = timer.seconds / repeat
        timer.remove()
        calls = 3 * nfe  # invert, edit and reconstruct make the same number of guided calls
        wall = statistics.median(walls)
        rows.append([solver, calls, fmt_s(wall), f"{wall / (calls * call):.3f}", f"{wall / inside:.3f}"])
    return rows


def batch_rows(
    pipe: Any, size: int, steps: int, solver: str, compile_modes: list[bool], repeat: int
) -> list[list[Any]]:
    rows = []
    for compiled in compile_modes:
        editor = Editor(pipe, solver=solver, steps=steps, progress=False, compile=compiled)
        for batch in BATCHES:
            x0 = pipe_latent(pipe, size, batch, seed=batch).to(editor.device)
            _peak_reset(editor.device)
            first, _ = _timed(editor, x0, 1)  # compiles this batch's shapes when compiled
            walls, _ = _timed(editor, x0, repeat)
            wall = statistics.median(walls)
            rows.append(
                [
                    "compiled" if compiled else "eager",
                    batch,
                    fmt_s(wall),
                    f"{batch / wall:.3f}",
                    fmt_s(max(0.0, first[0] - wall)),
                    _peak(editor.device),
                ]
            )
        if compiled:
            torch._dynamo.reset()
    return rows


def pipeline_row(pipe: Any, size: int, steps: int, repeat: int) -> list[Any]:
    """``Editor.edit`` (DDIM) vs ``pipe(...)`` from the same noise with as many UNet calls."""
    editor = Editor(pipe, solver="ddim", steps=steps, progress=False)
    inv = editor.invert_latent(pipe_latent(pipe, size).to(editor.device), SOURCE)
    noise = inv.latent.to(editor.unet.dtype)
    if editor.family.name == "flux":  # FluxPipeline takes its latents packed
        noise = pack_latents(noise)
    walls: dict[str, list[float]] = {"ours": [], "theirs": []}
    fns = {
        "ours": lambda: editor.edit(inv, TARGET, output_type="latent"),
        "theirs": lambda: pipe(
            TARGET,
            num_inference_steps=inv.nfe,
            guidance_scale=editor.guidance,
            latents=noise,
            height=size * editor.family.vae_scale,
            width=size * editor.family.vae_scale,
            output_type="latent",
        ),
    }
    for fn in fns.values():
        fn()
    for _ in range(repeat):
        for name, fn in fns.items():
            _sync(editor.device)
            start = time.perf_counter()
            fn()
            _sync(editor.device)
            walls[name].append(time.perf_counter() - start)
    ours, theirs = statistics.median(walls["ours"]), statistics.median(walls["theirs"])
    return [inv.nfe, fmt_s(ours), fmt_s(theirs), f"{ours / theirs:.3f}"]


def _synthetic_piebench(root: Path, size: int, n: int) -> Path:
    """``n`` smooth random ``size``-px images with box masks and prompt pairs, in PIE-Bench's format."""
    from PIL import Image

    from diffinv.bench import write_piebench

    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        mask = np.zeros((size, size), dtype=bool)
        mask[size // 4 : size // 2, size // 4 : size // 2] = True
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        source, target = f"a photo of a cat number {i}", f"a photo of a dog number {i}"
        items.append({"id": f"{i:012d}", "image": image, "mask": mask, "source": source, "target": target,
                      "edit_type": i % 10})  # fmt: skip
    return write_piebench(root, items)


def bench_rows(pipe: Any, size: int, steps: int, solver: str, repeat: int) -> list[list[Any]]:
    """``run_bench`` over 8 images at each batch size (median of ``repeat`` fresh runs), and the largest
    difference of its records' ``recon_latent_rmse`` and PSNR from batch size 1's."""
    from diffinv.bench import RunConfig, read_records, run_bench

    def factory(config: Any, device: Any) -> Editor:
        return Editor(pipe, solver=config.solver, steps=config.steps, spacing=config.spacing, progress=False,
                      **config.effective_guidance())  # fmt: skip

    config = RunConfig(model="random-weights", solver=solver, steps=steps, metrics=["psnr", "mse", "ssim"])
    rows, first, base = [], None, None
    with tempfile.TemporaryDirectory() as tmp:
        data = _synthetic_piebench(Path(tmp) / "pie", 8 * size, 8)
        for batch in BATCHES:
            walls = []
            for k in range(repeat + 1):  # the first run warms up
                out = Path(tmp) / f"b{batch}-{k}"
                start = time.perf_counter()
                run_bench(config, data, out, editor_factory=factory, device=str(pipe.device), progress=False,
                          batch_size=batch)  # fmt: skip
                walls.append(time.perf_counter() - start)
            records = read_records(out)
            first = first or records
            rmse = max(abs(a["recon_latent_rmse"] - b["recon_latent_rmse"]) for a, b in zip(records, first))
            psnr = max(abs(a["psnr"] - b["psnr"]) for a, b in zip(records, first))
            wall = statistics.median(walls[1:])
            base = base or wall
            row = [batch, fmt_s(wall), f"{len(records) / wall:.3f}", f"{base / wall:.2f}", f"{rmse:.1e}", f"{psnr:.1e}"]
            rows.append(row)
    return rows


def offload_row(pipe: Any, size: int, steps: int, device: torch.device) -> list[Any]:
    """Peak GPU memory and wall time of one DDIM round trip with ``offload="model"``."""
    _peak_reset(device)
    editor = Editor(pipe, solver="ddim", steps=steps, progress=False, offload="model", device=device)
    walls, _ = _timed(editor, pipe_latent(pipe, size).to(device), 1)
    return ["model", fmt_s(walls[0]), _peak(device)]


# -- the report ----------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        flux = f"FLUX.1-dev, {FLUX_BLOCKS[0]} + {FLUX_BLOCKS[1]} of 19 + 38 blocks (bf16)"
        models = {
            "SD 1.5 (fp16)": (sd15_pipe, 64),
            "SDXL (fp16)": (sdxl_pipe, 128),
            "SD3-medium (fp16)": (sd3_pipe, 128),
            flux: (flux_pipe, 128),
        }
    else:
        tiny = _tests_tiny()
        models = {
            "tiny SD UNet (fp32, CPU)": (tiny.tiny_sd_pipe, 8),
            "tiny SD3 transformer (fp32, CPU)": (tiny.tiny_sd3_pipe, 8),
            "tiny FLUX transformer (fp32, CPU)": (tiny.tiny_flux_pipe, 8),
        }
    info = machine_info()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({info['cpu']})"
    compile_modes = [False] if args.no_compile else [False, True]
    parts = [
        f"## GPU benchmark: {name}",
        "",
        f"`python benchmarks/gpu.py --device {args.device} --steps {args.steps}` on {info['date']}, torch "
        f"{info['torch']}, diffusers {info['diffusers']}. Random weights in the published architectures (no download); "
        "latent space (no VAE), one target per image, CFG on (batch 2 per image). Overhead ratio = wall / "
        "(model calls x median isolated call); ratio vs inside = wall / time inside the UNet in the same run.",
        "",
    ]
    if device.type != "cuda":
        load = info["load average at start (1, 5, 15 min)"]
        parts[-1:] = [
            f"Load average at start (1, 5, 15 min): {load} on {info['cores']} cores; the machine may be shared, so "
            "the timings are noisy: compare rows of one table, not runs.",
            "",
        ]
    for label, (build, size) in models.items():
        print(f"[gpu] {label} ...", file=sys.stderr, flush=True)
        pipe = build().to(device=device, dtype=torch.bfloat16 if "bf16" in label else dtype)
        pipe.set_progress_bar_config(disable=True)
        parts += [f"### {label}", "", f"Solver overhead, {args.steps} steps, B = 1:", ""]
        rows = overhead_rows(pipe, size, args.steps, tuple(args.solvers), args.repeat)
        parts += [md_table(["solver", "model calls", "wall", "overhead ratio", "ratio vs inside"], rows), ""]
        parts += [f"Images/s ({args.batch_solver}, invert + edit + reconstruct per image):", ""]
        rows = batch_rows(pipe, size, args.steps, args.batch_solver, compile_modes, args.repeat)
        head = ["mode", "B", "wall", "images/s", "first-run extra (compile)", "peak GPU memory"]
        parts += [md_table(head, rows), ""]
        row = pipeline_row(pipe, size, args.steps, args.repeat)
        parts += ["Editor.edit (DDIM) vs the diffusers pipeline, same UNet calls:", ""]
        parts += [md_table(["UNet calls", "Editor", "pipeline", "ratio"], [row]), ""]
        parts += [
            f"`diffinv bench --batch-size B` end to end ({args.batch_solver}, {args.steps} steps, 8 synthetic "
            f"{8 * size} px images: VAE, invert + edit + reconstruct, PNGs, records, PSNR/MSE/SSIM; median of "
            f"{args.repeat} runs); the last two columns: the largest difference of a record from B = 1's:",
            "",
        ]
        rows = bench_rows(pipe, size, args.steps, args.batch_solver, args.repeat)
        head = ["B", "wall", "images/s", "speed-up vs B = 1", "max Δ recon_latent_rmse", "max Δ psnr (dB)"]
        parts += [md_table(head, rows), ""]
        if device.type == "cuda" and "SDXL" in label:
            pipe.to("cpu")
            torch.cuda.empty_cache()
            parts += [
                "SDXL with CPU offload:",
                "",
                md_table(["offload", "wall", "peak GPU memory"], [offload_row(pipe, size, args.steps, device)]),
                "",
            ]
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return "\n".join(parts)


def write_section(path: Path, text: str) -> None:
    """Put ``text`` between this script's markers in ``path``, replacing an earlier section."""
    block = f"{BEGIN}\n{text}\n{END}"
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


def kept_section(path: Path) -> str:
    """This script's section of ``path`` (markers included), or ``""``: for ``benchmarks/run.py`` to keep."""
    if not path.exists():
        return ""
    found = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), path.read_text(), re.S)
    return found.group(0) if found else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50, help="solver steps (default 50; PIE-Bench's)")
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), help="solvers of the overhead table")
    parser.add_argument("--batch-solver", default="ees27", help="the solver of the images/s table (default ees27)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repeats per measurement (median)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled runs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    begin = time.perf_counter()
    with torch.inference_mode():
        text = measure(args)
    text += f"\n*Section time: {time.perf_counter() - begin:.0f} s.*"
    write_section(args.out, text)
    print(f"[gpu] wrote the section into {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
