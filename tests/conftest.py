"""Test-wide settings: no hub access, deterministic torch."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch

torch.use_deterministic_algorithms(False)
torch.manual_seed(0)
