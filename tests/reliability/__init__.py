"""Reliability and safety: hostile inputs, solver divergence, crash-safe runs, safe loading, fuzzing, determinism."""
