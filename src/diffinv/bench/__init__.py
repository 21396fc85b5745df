"""PIE-Bench harness: the data set, the runner over it, the paper's experiment presets and the report."""

from __future__ import annotations

from .piebench import EDIT_TYPES, PieBench, PieRecord, decode_mask, encode_mask, strip_markers, write_piebench
from .presets import PRESETS, PROMPT_RULES, Preset, get_preset, prompt_pairs
from .runner import COLUMNS, RECON_COLUMNS, RunConfig, load_editor, read_records, run_bench, score_run, write_table

__all__ = [
    "COLUMNS",
    "EDIT_TYPES",
    "PRESETS",
    "PROMPT_RULES",
    "RECON_COLUMNS",
    "PieBench",
    "PieRecord",
    "Preset",
    "RunConfig",
    "decode_mask",
    "encode_mask",
    "get_preset",
    "load_editor",
    "prompt_pairs",
    "read_records",
    "run_bench",
    "score_run",
    "strip_markers",
    "write_piebench",
    "write_table",
]
