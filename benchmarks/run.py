"""The benchmark suite: ``make bench`` (``python benchmarks/run.py --out BENCHMARKS.md``).

Measures, in one run on this machine's CPU: solver overhead per model call (1), speed against
diffusers (2), quality per NFE (3), invert once / edit many (4), memory against steps (5) and
mixed precision (6), and writes them with the machine, versions and date to a markdown file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import Section, machine_info, md_table

SECTIONS = ("overhead", "diffusers", "quality", "edit-many", "memory", "precision")


def diffusers_section(pairs: int, quick: bool) -> Section:
    from editing import editor_vs_pipeline
    from overhead import ddim_vs_diffusers

    start = time.perf_counter()
    rows, targets = ddim_vs_diffusers(pairs, sizes=(8,) if quick else (8, 32))
    more, more_targets = editor_vs_pipeline(pairs)
    header = ["what (ours vs diffusers)", "UNet calls", "ours (min / median)", "diffusers (min / median)"]
    header += ["ratio: raw (median of pairs)", "ratio: model-time normalised", "outputs differ by"]
    body = [
        'Same model, same number of UNet calls. DDIM: `diffinv.invert` + `generate` with `solver="ddim"` '
        '(`inversion_timestep="target"`, diffusers\' grid 981, ..., 1, 0) against a loop over '
        "`DDIMInverseScheduler.step` then `DDIMScheduler.step`; the outputs agree to float32 round-off. "
        'Editor: `Editor.edit(inv, prompt, output_type="latent")` from a stored inversion against '
        '`StableDiffusionPipeline(prompt, num_inference_steps=NFE, output_type="latent")` from the same noise '
        "(both encode the prompt and batch CFG). Runs alternate in adjacent pairs (ours first, then theirs "
        "first, ...) after one warm-up each. *Raw*: the median over pairs of ours / theirs. *Model-time "
        "normalised*: the time inside the UNet is measured in every run (a wrapper or forward hooks); both sides "
        "make the same UNet calls, so `(M + o_ours) / (M + o_theirs)` with `M` the median UNet time of all runs "
        "and `o` each side's median of wall - UNet time compares everything else without the UNet's noise on "
        "this shared machine. The targets use the normalised ratio; the raw one is shown beside it.",
        "",
        md_table(header, rows + more),
    ]
    return Section("2. Against diffusers", "\n".join(body), targets + more_targets, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file to write")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes (a smoke run, not for figures)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out).resolve()
    plot = Path(__file__).resolve().parent / "quality_per_nfe.png"
    link = os.path.relpath(plot, out.parent)
    chosen = args.only or SECTIONS
    quick = args.quick
    info = machine_info()
    begin = time.perf_counter()

    sections: list[Section] = []
    for name in SECTIONS:
        if name not in chosen:
            continue
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        if name == "overhead":
            from overhead import overhead_section

            sec = overhead_section(repeat_analytic=2 if quick else 5, repeat_unet=1, sizes=(8,) if quick else (8, 32))
        elif name == "diffusers":
            sec = diffusers_section(pairs=2 if quick else 4, quick=quick)
        elif name == "quality":
            from quality import quality_section

            sec = quality_section(plot, link)
        elif name == "edit-many":
            from editing import edit_many_section

            sec = edit_many_section(repeat=1 if quick else 2, ks=(1, 4) if quick else (1, 4, 16))
        elif name == "memory":
            from memory import memory_section

            sec = memory_section()
        else:
            from precision import precision_section

            sec = precision_section(repeat=1 if quick else 3)
        print(f"[bench] {name}: {sec.seconds:.0f} s", file=sys.stderr, flush=True)
        sections.append(sec)
    total = time.perf_counter() - begin
    from gpu import kept_section

    kept = kept_section(out)  # benchmarks/gpu.py's section, measured separately (on a GPU when one is there)
    out.write_text(render(info, sections, total, quick) + (f"\n{kept}\n" if kept else ""))
    print(f"[bench] wrote {out} in {total:.0f} s", file=sys.stderr)
    return 0


def render(info: dict[str, str], sections: list[Section], total: float, quick: bool) -> str:
    targets = [t for s in sections for t in s.targets]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python benchmarks/run.py --out BENCHMARKS.md`); do not edit by hand."
        + (" **Quick smoke run: not for citing.**" if quick else ""),
        "",
        md_table(["", ""], [[k, v] for k, v in info.items()]),
        "",
        f"Total run time: {total:.0f} s. Timings are wall clock, min / median over repeats, on a machine shared "
        "with other jobs (see the load average); ratios are taken between measurements made side by side. "
        "GPU figures (full-size SD 1.5 and SDXL) come from `benchmarks/gpu.py`, in its own section at the end.",
        "",
        "## Targets",
        "",
        md_table(
            ["item", "target", "measured", "holds"],
            [[t.item, t.what, t.value, "yes" if t.holds else "**no**"] for t in targets],
        ),
        "",
    ]
    for sec in sections:
        lines += [f"## {sec.title}", "", sec.body, "", f"*Section time: {sec.seconds:.0f} s.*", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
