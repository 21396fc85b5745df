"""The paper's PIE-Bench experiments as named presets, and the prompt rules they use.

A preset is a list of runs; each run is a name (its folder under ``--out``) and the settings it changes
from the command line's. ``diffinv bench --list-presets`` prints them.

Prompt rules (``--prompts``):

* ``standard``: PIE-Bench's source and target prompts, ``[ ]`` markers stripped.
* ``large-deviation``: the target replaces the whole scene description. Rule: in the id-sorted list of
  *all* records of the mapping file (whatever ``--types``/``--limit`` select, so the pairing never
  changes), record ``i`` takes as target the source prompt of record ``(i + n // 2) mod n``. This pairs
  every image with an unrelated scene, deterministically. The mask stays the data set's, so the background
  metrics measure how much of the original background survives such a rewrite.
* ``greyscale``: target = ``"a black and white photo of " + source`` (source stripped of markers, a
  leading "a photo of " removed, trailing period removed, first letter lower-cased).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .piebench import PieBench, PieRecord

__all__ = ["PRESETS", "PROMPT_RULES", "Preset", "get_preset", "prompt_pairs"]

PROMPT_RULES = ("standard", "large-deviation", "greyscale")


def _greyscale_target(source: str) -> str:
    text = source.strip().rstrip(".").strip()
    if text.lower().startswith("a photo of "):
        text = text[len("a photo of ") :]
    text = text[:1].lower() + text[1:]
    return f"a black and white photo of {text}"


def prompt_pairs(data: PieBench, rule: str = "standard") -> dict[str, tuple[str, str]]:
    """``{image id: (source prompt, target prompt)}`` for the selected records under ``rule``."""
    if rule not in PROMPT_RULES:
        raise ValueError(f"unknown prompt rule {rule!r}; choose one of {', '.join(PROMPT_RULES)}")
    if rule == "standard":
        return {r.id: (r.source_prompt, r.target_prompt) for r in data}
    if rule == "greyscale":
        return {r.id: (r.source_prompt, _greyscale_target(r.source_prompt)) for r in data}
    everything: list[PieRecord] = data.all_records
    position = {r.id: i for i, r in enumerate(everything)}
    n = len(everything)
    if n < 2:
        raise ValueError("the large-deviation rule needs at least 2 records in the mapping file")
    return {r.id: (r.source_prompt, everything[(position[r.id] + n // 2) % n].source_prompt) for r in data}


@dataclass(frozen=True)
class Preset:
    """A named experiment: ``runs`` maps a run name to the run settings it overrides."""

    name: str
    description: str
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)


MAIN_SOLVERS = ("ddim", "edict", "bdia", "belm", "rex", "ees25", "ees27")
SMOOTHINGS = {
    "none": [],
    "npi": ["npi"],
    "proximal": ["proximal"],
    "sd": ["smooth-lora"],
    "sd+pg": ["smooth-lora", "proximal"],
}


def _solver_runs(**common: Any) -> dict[str, dict[str, Any]]:
    return {s: {"solver": s, **common} for s in MAIN_SOLVERS}


# PnPInversion's P2P rows (run_editing_p2p.py, models/p2p_editor.py): guidance 7.5, P2P's defaults (cross 0.4,
# self 0.6, PIE-Bench's blend words); its DDIM inverts as NullInversion.next_step does (eps at the noisier
# timestep) at guidance 1, which null-text, DirectInversion and NPI use as their pivot.
P2P_GUIDANCE = 7.5
OFFICIAL_DDIM = {"solver": "ddim", "solver_options": {"inversion_timestep": "target"}}
PIE_P2P_ROWS = {
    "ddim+p2p": {**OFFICIAL_DDIM, "inversion_guidance": 1.0},
    "null-text-inversion+p2p": {**OFFICIAL_DDIM, "inversion": "null-text"},
    "directinversion+p2p": {**OFFICIAL_DDIM, "inversion": "direct"},
    "negative-prompt-inversion+p2p": {**OFFICIAL_DDIM, "smoothing": ["npi"]},
    **{f"{s}+p2p": {"solver": s} for s in ("ees27", "edict", "bdia", "belm", "rex")},
}


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("standard", "the PIE-Bench table: every main solver, PIE-Bench prompts", _solver_runs()),
        Preset(
            "large-deviation",
            "targets that rewrite the whole scene (the large-prompt-deviation rule)",
            _solver_runs(prompts="large-deviation"),
        ),
        Preset(
            "greyscale", "greyscale conversion: 'a black and white photo of ...'", _solver_runs(prompts="greyscale")
        ),
        Preset(
            "guidance",
            "editing guidance-scale sweep",
            {
                f"{s}-w{w:g}": {"solver": s, "guidance": w}
                for s in ("edict", "bdia", "ees25", "ees27")
                for w in (1.0, 2.0, 3.0, 5.0, 7.5)
            },
        ),
        Preset(
            "bdia-gamma",
            "BDIA gamma sweep",
            {
                f"bdia-gamma{g:g}": {"solver": "bdia", "solver_options": {"gamma": g}}
                for g in (0.5, 0.8, 0.9, 0.92, 0.96, 1.0)
            },
        ),
        Preset(
            "edict-p",
            "EDICT mixing p sweep",
            {
                f"edict-p{p:g}": {"solver": "edict", "solver_options": {"p": p}}
                for p in (0.8, 0.85, 0.9, 0.93, 0.95, 0.97)
            },
        ),
        Preset(
            "solver-ablation",
            "solver configuration: ODE form x grid spacing x solver",
            {
                f"{s}-{form}-{spacing}": {"solver": s, "solver_options": {"form": form}, "spacing": spacing}
                for s in ("heun", "rk4", "ees25", "ees27")
                for form in ("t", "lambda-eps", "lambda-x", "sigma")
                for spacing in ("lambda", "time", "sigma")
            },
        ),
        Preset(
            "pie-p2p",
            "PnPInversion's PIE-Bench table: DDIM, null-text, DirectInversion and NPI with Prompt-to-Prompt, and each "
            "main solver with P2P (guidance 7.5, P2P defaults; official model: SD 1.4/1.5 at 50 steps)",
            {name: {**run, "control": "p2p", "guidance": P2P_GUIDANCE} for name, run in PIE_P2P_ROWS.items()},
        ),
        Preset(
            "smoothing",
            "with and without each smoothing strategy",
            {
                f"{s}-{tag}": {"solver": s, "smoothing": list(smoothing)}
                for s in ("edict", "bdia", "belm", "ees25", "ees27")
                for tag, smoothing in SMOOTHINGS.items()
            },
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
