"""Test-wide settings: no hub access, one intra-op thread.

The tests run thousands of tiny-tensor operations, where a second intra-op thread only adds
synchronisation (3-20x slower on a busy 2-core machine, measured), so the suite runs on one thread.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch

torch.set_num_threads(1)
torch.manual_seed(0)
