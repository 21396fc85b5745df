"""The editing-control options (``--control p2p`` and the Prompt-to-Prompt settings), shared by ``edit`` and
``bench``: one place that defines the flags and turns them into ``Editor.edit`` keywords."""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..controls.p2p import MODES, P2POptions

CONTROL_CHOICES = ("none", "p2p")
# flag dest -> P2POptions field; the flags only set what is given, so P2POptions holds the defaults
P2P_FLAGS = {
    "p2p_mode": "mode",
    "cross_replace_steps": "cross_replace_steps",
    "self_replace_steps": "self_replace_steps",
    "equalizer": "equalizer",
    "blend_threshold": "blend_threshold",
    "blend_start": "blend_start",
}


def add_control_arguments(p: Any, bench: bool = False) -> None:
    """``--control`` and the P2P flags; ``bench``: blend words come from each record's ``blended_word``."""
    d = P2POptions()
    p.add_argument(
        "--control",
        choices=CONTROL_CHOICES,
        default=None,
        help="attention control while editing: p2p = Prompt-to-Prompt (a source branch in the same batch hands "
        "its attention to the targets); default none (plain regeneration under the target prompt)",
    )
    p.add_argument(
        "--p2p-mode",
        choices=MODES,
        default=None,
        help=f"p2p cross-attention edit: refine (token alignment, any prompts), replace (word swap, same word "
        f"count) or auto (replace when the word counts match) (default {d.mode}, as PnPInversion's PIE-Bench runs)",
    )
    for flag, default in (("cross", d.cross_replace_steps), ("self", d.self_replace_steps)):
        p.add_argument(
            f"--{flag}-replace-steps",
            default=None,
            metavar="F|START,END",
            help=f"p2p: inject the source's {flag}-attention for this fraction of the solver steps, or from START "
            f"to END (default {default})",
        )
    if not bench:
        p.add_argument(
            "--blend-words",
            nargs=2,
            default=None,
            metavar=("SOURCE", "TARGET"),
            help="p2p local blend: the source and target words whose attention masks the edited region "
            "(several words comma-separated); default: the words inside [ ] in the prompts, if any",
        )
    p.add_argument(
        "--no-blend",
        action="store_true",
        help="p2p: no local blending"
        + (" (default: each record's blended_word)" if bench else " (not even from [ ] markers)"),
    )
    p.add_argument(
        "--equalizer",
        action="append",
        default=None,
        metavar="SCALE" if bench else "WORD=SCALE|SCALE",
        help="p2p attention re-weighting: the target blend word's cross-attention times SCALE (default 2, as "
        "PnPInversion's PIE-Bench runs; 1 = off)"
        if bench
        else "p2p attention re-weighting: WORD's cross-attention in the target times SCALE (repeatable), or one "
        "SCALE for the target blend words (default: none)",
    )
    p.add_argument(
        "--blend-threshold",
        type=float,
        default=None,
        metavar="F",
        help=f"p2p local-blend mask threshold (default {d.blend_threshold})",
    )
    p.add_argument(
        "--blend-start",
        type=float,
        default=None,
        metavar="F",
        help=f"p2p: fraction of the steps before local blending starts (default {d.blend_start})",
    )


def _fraction(text: str, flag: str) -> float | tuple[float, float]:
    parts = text.split(",")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(math.isfinite(v) and 0 <= v <= 1 for v in values):
        raise ValueError(f"{flag} must be a fraction in [0, 1] or START,END, got {text!r}")
    if len(values) == 2 and values[0] > values[1]:
        raise ValueError(f"{flag} START must not exceed END, got {text!r}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def _scale(text: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{flag} needs a finite number, got {text!r}")
    return value


def _equalizer(items: list[str], bench: bool) -> dict[str, float] | float:
    """``WORD=SCALE`` items as a dict, or one bare ``SCALE``."""
    bare = [i for i in items if "=" not in i]
    if bare and len(items) > 1:
        raise ValueError("--equalizer takes one SCALE, or WORD=SCALE items (repeat the flag)")
    if bare:
        return _scale(bare[0], "--equalizer")
    if bench:
        raise ValueError(f"--equalizer in bench takes one SCALE for each record's target blend word, got {items[0]!r}")
    out = {}
    for item in items:
        word, _, value = item.partition("=")
        if not word.strip() or " " in word.strip():
            raise ValueError(f"--equalizer must be WORD=SCALE with one word, got {item!r}")
        out[word.strip()] = _scale(value, f"--equalizer {word.strip()}")
    return out


def control_options(args: argparse.Namespace, bench: bool = False) -> tuple[str | None, dict[str, Any]]:
    """``(control, p2p options)`` from the flags: only the options given (the rest are P2POptions' defaults).
    P2P flags without ``--control p2p`` are an error, except in ``bench`` (a preset's runs may set the control;
    the run configuration checks it). In ``bench``, ``blend: false`` stands for ``--no-blend``."""
    control = None if args.control in (None, "none") else args.control
    options: dict[str, Any] = {}
    given = []
    for dest, key in P2P_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        flag = "--" + dest.replace("_", "-")
        given.append(flag)
        if key.endswith("replace_steps"):
            value = _fraction(value, flag)
        elif key == "equalizer":
            value = _equalizer(value, bench)
        options[key] = value
    words = getattr(args, "blend_words", None)
    if args.no_blend and words is not None:
        raise ValueError("--blend-words and --no-blend exclude each other")
    if args.no_blend:
        given.append("--no-blend")
        options["blend" if bench else "blend_words"] = False if bench else ()
    elif words is not None:
        given.append("--blend-words")
        source, target = ([w for w in side.split(",") if w.strip()] for side in words)
        if not source or not target:
            raise ValueError(f"--blend-words needs a source and a target word, got {words!r}")
        options["blend_words"] = (tuple(w.strip() for w in source), tuple(w.strip() for w in target))
    if given and control != "p2p" and not (bench and args.control is None):
        raise ValueError(f"{given[0]} needs --control p2p")
    P2POptions.from_dict({k: v for k, v in options.items() if k != "blend"})  # bad values: one line, before loading
    return control, options
