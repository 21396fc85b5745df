"""Shared test problems: schedules, a small nonlinear analytic model and a high-accuracy reference flow."""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import settings
from PIL import Image
from scipy.integrate import solve_ivp

from diffinv.analytic import GaussianMixture
from diffinv.fields import Field
from diffinv.schedules import ContinuousScaledLinear, NoiseSchedule


@functools.cache
def sd_schedule() -> NoiseSchedule:
    """SD 1.x's discrete scaled-linear schedule (log alpha piecewise linear in t)."""
    return NoiseSchedule.scaled_linear()


@functools.cache
def smooth_schedule() -> NoiseSchedule:
    """The same schedule in continuous time with a smooth log alpha (needed for high order in the "t" form)."""
    return ContinuousScaledLinear()


def mixture(schedule: NoiseSchedule, dim: int = 3) -> GaussianMixture:
    """A 3-component Gaussian mixture in ``dim`` dimensions: a nonlinear eps, smooth at moderate resolution."""
    g = torch.Generator().manual_seed(1)
    means = torch.randn(3, dim, generator=g, dtype=torch.float64)
    variances = 0.15 + 0.2 * torch.rand(3, dim, generator=g, dtype=torch.float64)
    return GaussianMixture(schedule, means, variances, torch.tensor([0.5, 0.3, 0.2]))


def start_points(model: GaussianMixture, n: int = 4, seed: int = 0) -> torch.Tensor:
    """``n`` float64 points of the noisy end (pure noise at the schedule's last timestep is fine)."""
    return torch.randn(n, *model.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference_flow(model, schedule: NoiseSchedule, x: torch.Tensor, t_from: float, t_to: float) -> torch.Tensor:
    """The probability-flow map from ``t_from`` to ``t_to`` by DOP853 at rtol = atol = 1e-12.

    Integrates ``dx/dlam = sigma^2 x - sigma eps(x, t(lam))`` (solvers.md §2, P2): smooth in lambda for
    every schedule, so the reference is accurate to ~1e-11 whatever the schedule's t-parameterisation.
    """
    field = Field(model, schedule)
    shape = x.shape

    def rhs(lam: float, y: np.ndarray) -> np.ndarray:
        t = float(schedule.timestep_of_lam(lam))
        xs = torch.from_numpy(y).reshape(shape)
        _, sigma = field.coefficients(t)
        return (sigma**2 * xs - sigma * field.eps(xs, t)).reshape(-1).numpy()

    lam0, lam1 = float(schedule.lam(t_from)), float(schedule.lam(t_to))
    sol = solve_ivp(rhs, (lam0, lam1), x.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
    assert sol.success, sol.message
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)


def fitted_slope(xs, ys) -> float:
    """Least-squares slope of ``log y`` against ``log x``."""
    lx = np.log(np.asarray(xs, dtype=float))
    ly = np.log(np.asarray(ys, dtype=float))
    return float(np.polyfit(lx, ly, 1)[0])


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


def isclose_all(values, expected, tol: float) -> bool:
    return all(math.isclose(v, e, abs_tol=tol) for v, e in zip(values, expected, strict=True))


def in_ci() -> bool:
    """Whether the suite runs in CI (``CI=true``, as ``make test`` and ``.ci/run`` set it)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(module: str, reason: str | None = None):
    """``pytest.importorskip(module)``, except under CI (:func:`in_ci`), where a failed import fails the test:
    CI installs every extra, so a missing module there is a broken install, not a reason to skip."""
    if not in_ci():
        return pytest.importorskip(module, reason=reason)
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        pytest.fail(f"{module} does not import under CI=true ({reason or 'needed by this test'}): {err}")


def fuzz(max_examples: int, **options) -> settings:
    """Hypothesis settings of a fuzz test: ``max_examples`` in the deterministic ``ci`` profile, ten times as many
    under ``HYPOTHESIS_PROFILE=explore`` (tests/conftest.py); no deadline (the machine is shared)."""
    explore = settings.get_current_profile_name() == "explore"
    return settings(max_examples=max_examples * (10 if explore else 1), deadline=None, **options)


class FakeInversion:
    """What the stand-in editors' ``invert`` returns: the images' pixels (int64, one row per image) and, as the
    runner reads it, ``source``, the "encoded source latents" (pixels / 255)."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels

    @property
    def source(self) -> torch.Tensor:
        return torch.from_numpy(self.pixels / 255)


class FakeRoundTrip:
    """The stand-in editors' reconstruction: latent (pixels + 1) / 255, so its latent RMSE is exactly 1/255."""

    def reconstruct(self, inv: FakeInversion, output_type: str = "pil"):
        latent = torch.from_numpy((inv.pixels + 1) / 255)
        return latent if output_type == "latent" else self.decode_latents(latent)

    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        return [Image.fromarray(np.clip(np.rint(row * 255), 0, 255).astype(np.uint8)) for row in latents.numpy()]
