"""Shared fixtures of the reliability suite: a tiny saved SD pipeline and a tiny PIE-Bench folder."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random StableDiffusionPipeline saved as a diffusers folder (safetensors weights)."""
    from tiny import tiny_sd_pipe

    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    tiny_sd_pipe().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pie_data(tmp_path_factory):
    """A six-image PIE-Bench folder in the official format (64x64 images)."""
    from test_piebench import make_dataset

    root, _ = make_dataset(tmp_path_factory.mktemp("pie") / "pie", size=64)
    return root
