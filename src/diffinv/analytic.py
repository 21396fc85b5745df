"""Closed-form test models: diffusion denoisers whose exact eps (and, for Gaussians, exact flow) are known.

For data ``x0 ~ sum_k pi_k N(mu_k, diag s_k^2)`` and ``x_t = alpha_t x0 + sigma_t eps`` the marginal is
``sum_k pi_k N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2))`` and the exact noise prediction is
``eps(x, t) = (x - alpha E[x0 | x]) / sigma`` with
``E[x0 | x] = sum_k w_k(x) [mu_k + alpha s_k^2 (x - alpha mu_k) / (alpha^2 s_k^2 + sigma^2)]``.
A single Gaussian keeps ``(x - alpha mu) / sqrt(v_t)`` constant along the probability-flow ODE, so
its flow is exact in every time variable.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .schedules import NoiseSchedule

__all__ = ["GaussianMixture", "GaussianModel"]


def _coeffs(schedule: NoiseSchedule, t: Any, batch: int) -> tuple[Tensor, Tensor]:
    """``alpha`` and ``sigma`` as float64 column vectors of length ``batch`` (``t`` scalar or per-sample)."""
    tt = torch.as_tensor(t, dtype=torch.float64).detach().cpu().flatten()
    if tt.numel() == 1:
        tt = tt.expand(batch)
    elif tt.numel() != batch:
        raise ValueError(f"t has {tt.numel()} entries for a batch of {batch}")
    return schedule.alpha(tt)[:, None], schedule.sigma(tt)[:, None]


class GaussianMixture:
    """A diagonal Gaussian mixture over flattened data of shape ``shape``, with its exact denoiser.

    ``means``: ``(K, *shape)``; ``variances``: ``(K, *shape)``, ``(K,)`` or a float; ``weights``: ``(K,)``.
    Computation is in float64; outputs come back in the input's dtype and device.
    """

    def __init__(
        self, schedule: NoiseSchedule, means: Tensor, variances: Tensor | float, weights: Tensor | None = None
    ):
        self.schedule = schedule
        means = torch.as_tensor(means, dtype=torch.float64)
        self.shape = tuple(means.shape[1:])
        k = means.shape[0]
        self.mu = means.reshape(k, -1)
        var = torch.as_tensor(variances, dtype=torch.float64)
        if var.dim() == 0:
            var = var.expand(k)
        self.var = (var.reshape(k, 1) if var.dim() == 1 else var.reshape(k, -1)).expand_as(self.mu).clone()
        if (self.var <= 0).any():
            raise ValueError("mixture variances must be positive")
        w = (
            torch.full((k,), 1.0 / k, dtype=torch.float64)
            if weights is None
            else torch.as_tensor(weights, dtype=torch.float64)
        )
        if w.shape != (k,) or (w <= 0).any():
            raise ValueError(f"weights must be {k} positive numbers")
        self.log_w = torch.log(w / w.sum())

    @property
    def components(self) -> int:
        return self.mu.shape[0]

    def _posterior(self, x: Tensor, t: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Flattened float64 ``x``, per-sample ``alpha, sigma`` and the component log-densities of ``x``."""
        b = x.shape[0]
        xf = (
            x.detach().to(torch.float64).cpu().reshape(b, -1)
            if x.requires_grad
            else x.to("cpu", torch.float64).reshape(b, -1)
        )
        a, s = _coeffs(self.schedule, t, b)
        v = a[:, :, None] ** 2 * self.var[None] + s[:, :, None] ** 2  # (B, K, D)
        r = xf[:, None, :] - a[:, :, None] * self.mu[None]
        logp = self.log_w[None] - 0.5 * (torch.log(2 * math.pi * v) + r**2 / v).sum(-1)  # (B, K)
        return xf, a, s, logp

    def x0(self, x: Tensor, t: Any) -> Tensor:
        """Posterior mean ``E[x0 | x_t = x]``."""
        xf, a, s, logp = self._posterior(x, t)
        w = torch.softmax(logp, dim=-1)  # (B, K)
        v = a[:, :, None] ** 2 * self.var[None] + s[:, :, None] ** 2
        cond = self.mu[None] + a[:, :, None] * self.var[None] * (xf[:, None, :] - a[:, :, None] * self.mu[None]) / v
        return (w[:, :, None] * cond).sum(1).reshape(x.shape).to(x.device, x.dtype)

    def eps(self, x: Tensor, t: Any) -> Tensor:
        """The exact noise prediction ``(x - alpha E[x0|x]) / sigma``."""
        b = x.shape[0]
        a, s = _coeffs(self.schedule, t, b)
        shape = (b,) + (1,) * (x.dim() - 1)
        xf = x.to(torch.float64).cpu()
        out = (xf - a.reshape(shape) * self.x0(xf, t)) / s.reshape(shape)
        return out.to(x.device, x.dtype)

    __call__ = eps

    def log_prob(self, x: Tensor, t: Any = 0.0) -> Tensor:
        """Exact log-density of ``x`` under the marginal at timestep ``t`` (per sample)."""
        return torch.logsumexp(self._posterior(x, t)[3], dim=-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples of the data distribution (float64)."""
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.mu.shape[1], dtype=torch.float64, generator=generator)
        return (self.mu[k] + self.var[k].sqrt() * z).reshape(n, *self.shape)


class GaussianModel(GaussianMixture):
    """One diagonal Gaussian ``N(mu, diag s^2)``: exact eps and the exact probability-flow map."""

    def __init__(self, schedule: NoiseSchedule, mean: Tensor, variance: Tensor | float):
        mean = torch.as_tensor(mean, dtype=torch.float64)
        var = torch.as_tensor(variance, dtype=torch.float64)
        var = var.expand_as(mean) if var.dim() == 0 else var
        super().__init__(schedule, mean[None], var[None])

    def flow(self, x: Tensor, t_from: float, t_to: float) -> Tensor:
        """The exact probability-flow ODE map of ``x`` from timestep ``t_from`` to ``t_to``."""
        b = x.shape[0]
        a0, s0 = (float(c) for c in (self.schedule.alpha(t_from), self.schedule.sigma(t_from)))
        a1, s1 = (float(c) for c in (self.schedule.alpha(t_to), self.schedule.sigma(t_to)))
        v0 = a0**2 * self.var[0] + s0**2
        v1 = a1**2 * self.var[0] + s1**2
        xf = x.to("cpu", torch.float64).reshape(b, -1)
        out = a1 * self.mu[0] + torch.sqrt(v1 / v0) * (xf - a0 * self.mu[0])
        return out.reshape(x.shape).to(x.device, x.dtype)
