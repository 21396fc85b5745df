"""Device names from the user, checked before any model is loaded."""

from __future__ import annotations

import torch

__all__ = ["check_device"]


def check_device(device: str | torch.device | None) -> None:
    """Raise ``ValueError`` unless ``device`` is None or a device torch knows and this machine has."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r} is not available here ({torch.cuda.device_count()} CUDA devices)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} is not available here")
