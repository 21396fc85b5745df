"""Editing controls that act inside the denoiser or between solver steps (Prompt-to-Prompt, DirectInversion)."""

from .direct import DirectOffsets, check_one_step
from .p2p import (
    P2POptions,
    PromptToPrompt,
    alignment_mapper,
    marked_words,
    replacement_mapper,
    strip_markers,
    word_token_indices,
)

__all__ = [
    "DirectOffsets",
    "P2POptions",
    "PromptToPrompt",
    "alignment_mapper",
    "check_one_step",
    "marked_words",
    "replacement_mapper",
    "strip_markers",
    "word_token_indices",
]
