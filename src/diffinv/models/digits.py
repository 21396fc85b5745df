"""The shipped digits model: a small trained class-conditional diffusion UNet, its judge and sample digits.

A learned vector field, offline: a diffusers ``UNet2DModel`` (165 k parameters, channels 16/32, no
attention) trained by :mod:`diffinv.train_digits` on scikit-learn's handwritten digits (16x16, one
channel, pixels in [-1, 1]) under Stable Diffusion 1.5's scaled-linear schedule. Class ``10`` is the
unconditional branch (15 % label dropout), so classifier-free guidance works as in Stable Diffusion.
The judge is a logistic regression on the pixels; the samples are real digits of each class.

``time_input`` says which timestep the network sees at a fractional ``t`` (the solver still steps at
``t``): ``"exact"`` (``t`` itself), ``"round"`` (the nearest integer, the only timesteps the network
was trained on) or ``"lerp"`` (the linear interpolation of its outputs at the two neighbouring integer
timesteps: a field continuous and piecewise linear in ``t``, at twice the cost).
See docs/digits-roundtrip.md for why this matters to EES's round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..fields import EpsModel
from ..schedules import NoiseSchedule

__all__ = ["NULL_CLASS", "TIME_INPUTS", "DigitsJudge", "DigitsModel", "load_digits_judge", "load_digits_model"]

HERE = Path(__file__).parent
UNET_FILE = HERE / "digits_unet.safetensors"
JUDGE_FILE = HERE / "digits_judge.safetensors"
SAMPLES_FILE = HERE / "digits_samples.safetensors"
NULL_CLASS = 10
TIME_INPUTS = ("exact", "round", "lerp")
SHAPE = (1, 16, 16)


def _load(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path.name} is missing from the diffinv package (reinstall diffinv)")
    return load_file(str(path))


def _labels(labels: int | Sequence[int] | Tensor, batch: int) -> Tensor:
    y = torch.as_tensor(labels, dtype=torch.int64).flatten()
    if y.numel() == 1:
        y = y.expand(batch)
    if y.numel() != batch or ((y < 0) | (y > NULL_CLASS)).any():
        raise ValueError(f"labels must be {batch} digits in 0..9 (or {NULL_CLASS}, unconditional)")
    return y


@dataclass
class DigitsModel:
    """The trained UNet on its schedule; :meth:`eps` builds the guided eps-model the solvers call."""

    unet: torch.nn.Module
    schedule: NoiseSchedule
    samples: Tensor  # (10, n, 1, 16, 16) real digits per class, pixels in [-1, 1]

    shape = SHAPE

    def to(self, dtype: torch.dtype) -> DigitsModel:
        """The model with its weights cast to ``dtype`` (float64 for round-off-level experiments)."""
        return DigitsModel(self.unet.to(dtype), self.schedule, self.samples)

    def network_time(self, t: Tensor, time_input: str = "exact") -> Tensor:
        """The timestep the network is given at solver time ``t`` (see the module docstring)."""
        if time_input == "exact":
            return t
        if time_input == "round":
            return torch.round(t)
        if time_input == "lerp":
            return t  # eps() interpolates between the integer timesteps itself
        raise ValueError(f"time_input must be one of {', '.join(TIME_INPUTS)}, got {time_input!r}")

    @torch.no_grad()
    def raw_eps(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """The network's eps at ``x`` (batch), timestep(s) ``t`` and class ``labels`` (no guidance)."""
        dtype = next(self.unet.parameters()).dtype
        tt = torch.as_tensor(t).to(device=x.device, dtype=dtype).reshape(-1).expand(x.shape[0])
        return self.unet(x.to(dtype), tt, class_labels=labels).sample.to(x.dtype)

    def eps(
        self,
        labels: int | Sequence[int] | Tensor,
        guidance: float = 3.0,
        time_input: str = "exact",
        negative: int | None = None,
    ) -> EpsModel:
        """``eps(x, t)`` with classifier-free guidance ``w``: ``eps_null + w (eps_label - eps_null)``.

        ``labels`` is one digit for the whole batch or one per sample; ``guidance = 1`` is the plain
        conditional model (one network call), ``0`` the unconditional one. ``negative`` (a digit)
        replaces the null class as the unconditional branch (negative-prompt inversion).
        """
        self.network_time(torch.zeros(()), time_input)  # ValueError on a bad name
        w = float(guidance)
        null = NULL_CLASS if negative is None else int(negative)

        def eps(x: Tensor, t: Tensor) -> Tensor:
            if time_input == "lerp":  # the chord between the two neighbouring integer timesteps
                lo = torch.floor(t).clamp(max=self.schedule.T - 1)
                frac = (t - lo).to(x.dtype)
                return (1 - frac) * guided(x, lo) + frac * guided(x, lo + 1)
            return guided(x, self.network_time(t, time_input))

        def guided(x: Tensor, tn: Tensor) -> Tensor:
            y = _labels(labels, x.shape[0])
            u = _labels(null, x.shape[0])
            if w == 1.0:
                return self.raw_eps(x, tn, y)
            if w == 0.0:
                return self.raw_eps(x, tn, u)
            both = self.raw_eps(torch.cat([x, x]), tn, torch.cat([u, y]))
            uncond, cond = both.chunk(2)
            return uncond + w * (cond - uncond)

        return eps

    def sources(self, digit: int, n: int) -> Tensor:
        """The first ``n`` shipped real images of ``digit``, ``(n, 1, 16, 16)``."""
        if not 0 <= digit <= 9:
            raise ValueError(f"digit must be in 0..9, got {digit}")
        if not 1 <= n <= self.samples.shape[1]:
            raise ValueError(f"at most {self.samples.shape[1]} shipped images per digit, asked for {n}")
        return self.samples[digit, :n].clone()


@dataclass
class DigitsJudge:
    """Logistic regression on 16x16 pixels: which digit an image shows."""

    weight: Tensor  # (10, 256)
    bias: Tensor  # (10,)

    def logits(self, images: Tensor) -> Tensor:
        """Class logits of ``(n, 1, 16, 16)`` images."""
        feats = images.reshape(images.shape[0], -1).to(self.weight.dtype)
        return feats @ self.weight.T + self.bias

    def classify(self, images: Tensor) -> Tensor:
        """The predicted digit of each image."""
        return self.logits(images).argmax(-1)


def load_digits_model(dtype: torch.dtype = torch.float32) -> DigitsModel:
    """The shipped trained digits UNet (offline: the weights are package data), in eval mode."""
    from ..train_digits import build_unet

    unet = build_unet()
    unet.load_state_dict(_load(UNET_FILE))
    unet.eval().requires_grad_(False)
    return DigitsModel(unet.to(dtype), NoiseSchedule.scaled_linear(), _load(SAMPLES_FILE)["images"])


def load_digits_judge() -> DigitsJudge:
    """The shipped digit classifier (training accuracy 99 % on the 1797 digits)."""
    w = _load(JUDGE_FILE)
    return DigitsJudge(w["weight"], w["bias"])
