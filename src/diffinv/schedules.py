"""Noise schedules of VP diffusion models and the time grids that solvers step along.

A schedule maps a (fractional) model timestep ``t`` to ``alpha``, ``sigma`` and the half-log-SNR
``lam = log(alpha / sigma)``, and back from ``lam`` to ``t``. All schedule arithmetic runs in float64
on the CPU: grids are short, and doing it there keeps the solver loop free of device syncs.

Grids are plain float64 tensors of timesteps in generation order (noise -> data), ending at the
clean end ``t = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["SPACINGS", "NoiseSchedule", "check_grid", "make_grid"]

SPACINGS = ("lambda", "time", "sigma")


def _as_f64(t: Any) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class NoiseSchedule:
    """A VP noise schedule ``x_t = alpha_t x_0 + sigma_t eps`` over model timesteps ``[0, T]``.

    Built from a discrete ``alphas_cumprod`` (diffusers' ``alphas_cumprod``, ``alpha_bar = alpha**2``).
    Between integer timesteps ``log alpha`` is interpolated linearly, as DPM-Solver's "discrete"
    schedule does, so the inverse map ``lam -> t`` is exact and monotone.
    """

    def __init__(self, alphas_cumprod: Tensor | Sequence[float]):
        abar = _as_f64(alphas_cumprod).flatten()
        if abar.numel() < 2:
            raise ValueError(f"alphas_cumprod needs at least 2 entries, got {abar.numel()}")
        if not torch.isfinite(abar).all() or (abar <= 0).any() or (abar >= 1).any():
            raise ValueError("alphas_cumprod must be finite and strictly inside (0, 1)")
        if (abar[1:] >= abar[:-1]).any():
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.alphas_cumprod = abar
        self._log_alpha = 0.5 * torch.log(abar)
        self._lam = self._log_alpha - 0.5 * torch.log1p(-abar)

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor | Sequence[float]) -> NoiseSchedule:
        """Schedule from a discrete ``alphas_cumprod`` tensor."""
        return cls(alphas_cumprod)

    @classmethod
    def from_betas(cls, betas: Tensor | Sequence[float]) -> NoiseSchedule:
        """Schedule from per-step ``betas`` (``alphas_cumprod = cumprod(1 - betas)``)."""
        return cls(torch.cumprod(1.0 - _as_f64(betas), dim=0))

    @classmethod
    def scaled_linear(
        cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000
    ) -> NoiseSchedule:
        """Stable Diffusion's "scaled_linear" schedule (the SD 1.x / SDXL default)."""
        betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps, dtype=torch.float64)
        return cls.from_betas(betas**2)

    @classmethod
    def from_config(cls, config: Any) -> NoiseSchedule:
        """Schedule from a diffusers scheduler config (a dict or a ``FrozenDict``)."""
        cfg = dict(config)
        if cfg.get("trained_betas") is not None:
            return cls.from_betas(cfg["trained_betas"])
        kind = cfg.get("beta_schedule", "linear")
        n = int(cfg.get("num_train_timesteps", 1000))
        b0, b1 = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
        if kind == "scaled_linear":
            sched = cls.scaled_linear(b0, b1, n)
        elif kind == "linear":
            sched = cls.from_betas(torch.linspace(b0, b1, n, dtype=torch.float64))
        elif kind == "squaredcos_cap_v2":
            steps = torch.arange(n + 1, dtype=torch.float64) / n
            f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
            sched = cls.from_betas(torch.clamp(1 - f[1:] / f[:-1], max=0.999))
        else:
            raise ValueError(f"unsupported beta_schedule {kind!r} (use linear, scaled_linear or squaredcos_cap_v2)")
        if cfg.get("rescale_betas_zero_snr"):
            raise ValueError("zero-terminal-SNR schedules have lambda = -inf at t = T; not supported")
        return sched

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        """Schedule from a diffusers scheduler instance (uses its ``alphas_cumprod``)."""
        abar = getattr(scheduler, "alphas_cumprod", None)
        if abar is None:
            config = getattr(scheduler, "config", None)
            if config is None:
                raise ValueError(
                    f"{type(scheduler).__name__} has neither alphas_cumprod nor a config to build a schedule from"
                )
            return cls.from_config(config)
        return cls(abar)

    # -- the maps -----------------------------------------------------------------------------
    @property
    def T(self) -> float:
        """The largest model timestep (``num_train_timesteps - 1``)."""
        return float(self.alphas_cumprod.numel() - 1)

    def _interp(self, table: Tensor, t: Tensor) -> Tensor:
        t = _as_f64(t)
        if (t < 0).any() or (t > self.T).any():
            raise ValueError(f"timestep outside [0, {self.T:g}]: {t.min().item():g}..{t.max().item():g}")
        i = torch.clamp(torch.floor(t).long(), max=int(self.T) - 1)
        w = t - i
        return table[i] + w * (table[i + 1] - table[i])

    def log_alpha(self, t: Any) -> Tensor:
        """``log alpha_t`` at fractional timestep(s) ``t``."""
        return self._interp(self._log_alpha, t)

    def alpha(self, t: Any) -> Tensor:
        """``alpha_t = sqrt(alpha_bar_t)``."""
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Any) -> Tensor:
        """``sigma_t = sqrt(1 - alpha_t**2)``."""
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def lam(self, t: Any) -> Tensor:
        """Half-log-SNR ``lam_t = log(alpha_t / sigma_t)``."""
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2 * la))

    def chi(self, t: Any) -> Tensor:
        """``sigma_t / alpha_t = exp(-lam_t)`` (diffusers' and k-diffusion's "sigma")."""
        return torch.exp(-self.lam(t))

    def d_log_alpha(self, t: Any) -> Tensor:
        """``d log alpha / dt`` (piecewise constant between integer timesteps)."""
        t = _as_f64(t)
        i = torch.clamp(torch.floor(t).long(), 0, int(self.T) - 1)
        return self._log_alpha[i + 1] - self._log_alpha[i]

    def timestep_of_lam(self, lam: Any) -> Tensor:
        """Inverse of :meth:`lam`: the fractional timestep whose half-log-SNR is ``lam``."""
        lam = _as_f64(lam)
        lo, hi = self._lam[-1].item(), self._lam[0].item()
        if (lam < lo - 1e-12).any() or (lam > hi + 1e-12).any():
            raise ValueError(f"lambda outside the schedule's range [{lo:.6g}, {hi:.6g}]")
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2 * lam)
        # log alpha decreases with t: search the reversed (increasing) table.
        table = self._log_alpha.flip(0)
        j = torch.searchsorted(table, log_alpha.clamp(table[0], table[-1])).clamp(1, table.numel() - 1)
        i = int(self.T) - j  # integer timestep at the left of the bracket
        la0, la1 = self._log_alpha[i], self._log_alpha[i + 1]
        return (i + (log_alpha - la0) / (la1 - la0)).clamp(0.0, self.T)

    def timestep_of_chi(self, chi: Any) -> Tensor:
        """Inverse of :meth:`chi`."""
        return self.timestep_of_lam(-torch.log(_as_f64(chi)))

    def __repr__(self) -> str:
        abar = self.alphas_cumprod
        return f"NoiseSchedule(T={self.T:g}, alpha_bar[0]={abar[0]:.6g}, alpha_bar[T]={abar[-1]:.6g})"


def check_grid(schedule: NoiseSchedule, timesteps: Any) -> Tensor:
    """Validate an explicit grid (generation order, strictly decreasing, inside the schedule)."""
    try:
        grid = _as_f64(timesteps).flatten()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"timesteps must be a sequence of numbers: {err}") from None
    if grid.numel() < 2:
        raise ValueError(f"timesteps needs at least 2 entries (start and end), got {grid.numel()}")
    if not torch.isfinite(grid).all():
        raise ValueError("timesteps contain NaN or inf")
    if not (grid[1:] < grid[:-1]).all():
        raise ValueError("timesteps must be strictly decreasing (generation order: noisy -> clean)")
    if grid[-1] < 0 or grid[0] > schedule.T:
        raise ValueError(f"timesteps must lie in [0, {schedule.T:g}], got {grid[0].item():g}..{grid[-1].item():g}")
    return grid


def make_grid(
    schedule: NoiseSchedule,
    steps: int,
    spacing: str = "lambda",
    start: float | None = None,
    end: float = 0.0,
) -> Tensor:
    """Timesteps for ``steps`` solver steps, generation order, from ``start`` (default ``T``) to ``end``.

    ``spacing``: ``"lambda"`` uniform in half-log-SNR (the paper's default), ``"time"`` uniform in
    model timestep, ``"sigma"`` uniform in ``sigma/alpha``. Returns ``steps + 1`` float64 timesteps.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    start = schedule.T if start is None else float(start)
    if not (math.isfinite(start) and 0 <= end < start <= schedule.T):
        raise ValueError(f"start must satisfy {end:g} < start <= {schedule.T:g}, got {start!r}")
    if spacing == "time":
        grid = torch.linspace(start, end, steps + 1, dtype=torch.float64)
    elif spacing == "lambda":
        lams = torch.linspace(schedule.lam(start).item(), schedule.lam(end).item(), steps + 1, dtype=torch.float64)
        grid = schedule.timestep_of_lam(lams)
    elif spacing == "sigma":
        chis = torch.linspace(schedule.chi(start).item(), schedule.chi(end).item(), steps + 1, dtype=torch.float64)
        grid = schedule.timestep_of_chi(chis)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    grid[0], grid[-1] = start, end  # pin the endpoints against round-off in the inverse maps
    return check_grid(schedule, grid)
