"""Items 2b and 4: the Editor against StableDiffusionPipeline at equal NFE, and invert once / edit many."""

from __future__ import annotations

import time
from typing import Any

from common import ModuleTimer, Section, Target, Timing, fmt_s, latent, md_table, time_it, time_paired, tiny_sd_pipe
from overhead import comparison_row

from diffinv import Editor

GUIDANCE = 3.0
SOURCE = "a gray box on a table"
TARGETS = [f"a {c} {s} on a table" for c in ("red", "blue", "green", "gold") for s in ("box", "ball", "cat", "cup")]


def _editor(pipe: Any, solver: str, steps: int) -> Editor:
    return Editor(pipe, solver=solver, steps=steps, guidance=GUIDANCE, progress=False)


def editor_vs_pipeline(pairs: int) -> tuple[list[list[Any]], list[Target]]:
    """``Editor.edit`` (one target, CFG batched) vs ``StableDiffusionPipeline.__call__`` with the same UNet calls."""
    pipe = tiny_sd_pipe()
    x0 = latent(8)
    rows, targets = [], []
    for solver, steps in (("ddim", 50), ("ees27", 12)):
        editor = _editor(pipe, solver, steps)
        inv = editor.invert_latent(x0, SOURCE)
        nfe = inv.nfe  # generation makes as many guided calls as the inversion
        noise = inv.latent

        def ours(editor=editor, inv=inv):
            return editor.edit(inv, TARGETS[0], output_type="latent")

        def theirs(nfe=nfe, noise=noise):
            return pipe(
                TARGETS[0], num_inference_steps=nfe, guidance_scale=GUIDANCE, latents=noise, output_type="latent"
            ).images

        timer = ModuleTimer(pipe.unet)
        res = time_paired(ours, theirs, pairs, inside=lambda timer=timer: timer.seconds)
        timer.remove()
        what = f"Editor.edit ({solver}, {steps} steps) vs pipeline ({nfe} steps), CFG {GUIDANCE:g}, 8x8 latents"
        rows.append(comparison_row(what, nfe, res, None))
        ratio = res.normalised_ratio
        targets.append(Target("2", f"Editor ({solver}) / StableDiffusionPipeline <= 1.0", f"{ratio:.3f}", ratio <= 1.0))
    return rows, targets


def edit_many_section(repeat: int, solver: str = "ees27", steps: int = 10, ks: tuple[int, ...] = (1, 4, 16)) -> Section:
    """k target prompts from one inversion: one batched ``edit(inv, targets)`` vs k separate ``edit`` calls."""
    start = time.perf_counter()
    pipe = tiny_sd_pipe()
    editor = _editor(pipe, solver, steps)
    x0 = latent(8)
    inv_time, inv = time_it(lambda: editor.invert_latent(x0, SOURCE), 1, warmup=0)
    kmax = max(ks)
    # k separate runs: single edits timed one per target; k runs cost k times their median.
    single = Timing()
    editor.edit(inv, TARGETS[0], output_type="latent")  # warm-up
    for target in TARGETS[:kmax]:
        t0 = time.perf_counter()
        editor.edit(inv, target, output_type="latent")
        single.samples.append(time.perf_counter() - t0)
    table, targets = [], []
    for k in ks:
        batched, out = time_it(lambda k=k: editor.edit(inv, TARGETS[:k], output_type="latent"), repeat)
        separate = k * single.median
        ratio = batched.median / separate
        table.append([k, str(batched), fmt_s(separate), f"{ratio:.3f}", fmt_s(batched.median / k), out.shape[0]])
        if k == 16:
            targets.append(Target("4", "16 edits batched < 0.5 x 16 single runs", f"{ratio:.3f}", ratio < 0.5))
    nfe = inv.nfe
    body = [
        f"Tiny SD pipeline (8x8 latents), {solver} with {steps} steps ({nfe} guided UNet calls per edit, CFG "
        f"{GUIDANCE:g} batched: one UNet call of batch 2k per step), one inversion ({fmt_s(inv_time.median)}, not "
        'counted) shared by all edits, `output_type="latent"` (VAE decoding is per image either way). '
        f'Single edits: min / median {single} over {kmax} runs (one per target); "k separate runs" is k times '
        f"their median. Batched: min / median over {repeat} runs.",
        "",
        md_table(
            ["k", "batched edit(inv, k targets)", "k separate runs", "batched / separate", "per edit", "outputs"], table
        ),
    ]
    return Section("4. Invert once, edit many", "\n".join(body), targets, time.perf_counter() - start)
