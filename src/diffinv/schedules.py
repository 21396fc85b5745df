"""Noise schedules of Gaussian-path models (VP diffusion, rectified flow) and the time grids solvers step along.

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

__all__ = [
    "SPACINGS",
    "ContinuousScaledLinear",
    "FlowMatchingSchedule",
    "NoiseSchedule",
    "check_grid",
    "make_grid",
    "scheduler_timesteps",
]

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
        """Schedule from a diffusers scheduler config (a dict or a ``FrozenDict``).

        Reproduces diffusers' own construction bit for bit (betas and their cumulative product in
        float32), so the result equals ``from_scheduler`` of a scheduler built from the same config.
        """
        cfg = dict(config)
        if cfg.get("rescale_betas_zero_snr"):
            raise ValueError("zero-terminal-SNR schedules have lambda = -inf at t = T; not supported")
        n = int(cfg.get("num_train_timesteps", 1000))
        b0, b1 = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
        kind = cfg.get("beta_schedule", "linear")
        f32 = torch.float32
        if cfg.get("trained_betas") is not None:
            betas = torch.tensor(cfg["trained_betas"], dtype=f32)
        elif kind == "scaled_linear":
            betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=f32) ** 2
        elif kind == "linear":
            betas = torch.linspace(b0, b1, n, dtype=f32)
        elif kind == "squaredcos_cap_v2":

            def abar(s: float) -> float:
                return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=f32)
        else:
            raise ValueError(f"unsupported beta_schedule {kind!r} (use linear, scaled_linear or squaredcos_cap_v2)")
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def flow_matching(cls, num_train_timesteps: int = 1000) -> FlowMatchingSchedule:
        """The rectified-flow path ``x = (1 - sigma) x0 + sigma eps``, ``sigma = tau / N`` (SD3, FLUX)."""
        return FlowMatchingSchedule(num_train_timesteps)

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        """Schedule from a diffusers scheduler instance.

        DDPM-type schedulers give their ``alphas_cumprod``; ``FlowMatchEulerDiscreteScheduler`` gives the
        flow-matching path (its shift and dynamic shift only move the grid: use ``spacing="scheduler"``).
        Any other scheduler without ``alphas_cumprod`` (EDM, ...): ``ValueError``, never a guessed schedule.
        """
        if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
            return FlowMatchingSchedule(int(scheduler.config.num_train_timesteps))
        abar = getattr(scheduler, "alphas_cumprod", None)
        if abar is None:
            raise ValueError(
                f"{type(scheduler).__name__} has no alphas_cumprod: diffinv needs a DDPM-type (variance-preserving)"
                " noise schedule or FlowMatchEulerDiscreteScheduler; EDM-type schedulers are not supported"
            )
        return cls(abar)

    @property
    def is_flow(self) -> bool:
        """Whether the path reaches ``alpha = 0`` at ``T`` and ``sigma = 0`` at 0 (infinite half-log-SNR there)."""
        return False

    # -- the maps -----------------------------------------------------------------------------
    @property
    def T(self) -> float:
        """The largest model timestep (``num_train_timesteps - 1``)."""
        return float(self.alphas_cumprod.numel() - 1)

    def _check_t(self, t: Any) -> Tensor:
        t = _as_f64(t)
        if not ((t >= 0) & (t <= self.T)).all():
            raise ValueError(f"timestep outside [0, {self.T:g}]: {t.min().item():g}..{t.max().item():g}")
        return t

    def _interp(self, table: Tensor, t: Tensor) -> Tensor:
        t = self._check_t(t)
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

    def d_alpha(self, t: Any) -> Tensor:
        """``d alpha / dt``."""
        return self.alpha(t) * self.d_log_alpha(t)

    def d_sigma(self, t: Any) -> Tensor:
        """``d sigma / dt`` (from ``alpha**2 + sigma**2 = 1``)."""
        a = self.alpha(t)
        return -a * a * self.d_log_alpha(t) / self.sigma(t)

    def timestep_of_lam(self, lam: Any) -> Tensor:
        """Inverse of :meth:`lam`: the fractional timestep whose half-log-SNR is ``lam``."""
        lam = _as_f64(lam)
        lo, hi = self._lam[-1].item(), self._lam[0].item()
        if not ((lam >= lo - 1e-12) & (lam <= hi + 1e-12)).all():  # also rejects NaN
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


class ContinuousScaledLinear(NoiseSchedule):
    """The scaled-linear schedule in continuous time, with a closed-form, infinitely smooth ``log alpha``.

    Rex's closed form (reference/solvers.md §1 item 2): with ``t = (tau + 1) / N`` for model timestep
    ``tau``, ``beta(t) = (sqrt(b0) + (sqrt(b1) - sqrt(b0)) t)**2``, ``b0 = N beta_start``, ``b1 = N beta_end``,
    ``log alpha = -(D t^3 / 6 + B t^2 / 2 + b0 t / 2)`` with ``B = sqrt(b0 b1) - b0``, ``D = b1 - 2 sqrt(b0 b1) + b0``,
    and its inverse in closed form (a cubic). Its ``alphas_cumprod`` at integer timesteps agree with the
    discrete schedule's to ~4e-4. Unlike the discrete schedule, whose ``d log alpha / dt`` jumps at every
    integer timestep, the ``"t"`` ODE form is smooth here: use it to check high order in that form.
    """

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000):
        if not (0 < beta_start < beta_end < 1) or num_train_timesteps < 2:
            raise ValueError(
                f"need 0 < beta_start < beta_end < 1 and num_train_timesteps >= 2, got "
                f"{beta_start!r}, {beta_end!r}, {num_train_timesteps!r}"
            )
        n = int(num_train_timesteps)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.n, self.b0 = n, n * beta_start
        root = math.sqrt(self.b0 * n * beta_end)
        self.B, self.D = root - self.b0, n * beta_end - 2 * root + self.b0
        self.alphas_cumprod = torch.zeros(n, dtype=torch.float64)  # sets T for the range check below
        super().__init__(torch.exp(2 * self.log_alpha(torch.arange(n, dtype=torch.float64))))

    def log_alpha(self, t: Any) -> Tensor:
        s = (self._check_t(t) + 1) / self.n
        return -(self.D * s**3 / 6 + self.B * s**2 / 2 + self.b0 * s / 2)

    def d_log_alpha(self, t: Any) -> Tensor:
        s = (self._check_t(t) + 1) / self.n
        return -(self.D * s**2 / 2 + self.B * s + self.b0 / 2) / self.n

    def timestep_of_lam(self, lam: Any) -> Tensor:
        lam = _as_f64(lam)
        lo, hi = self.lam(self.T).item(), self.lam(0.0).item()
        if not ((lam >= lo - 1e-12) & (lam <= hi + 1e-12)).all():
            raise ValueError(f"lambda outside the schedule's range [{lo:.6g}, {hi:.6g}]")
        minus_2_log_alpha = torch.logaddexp(torch.zeros_like(lam), -2 * lam)
        # D s^3/3 + B s^2 + b0 s = -2 log alpha; u = D s + B gives u^3 = 3 D^2 (-2 log alpha) - 2 B^3 + 3 b0 D B
        cube = 3 * self.D**2 * minus_2_log_alpha - 2 * self.B**3 + 3 * self.b0 * self.D * self.B
        u = torch.sign(cube) * cube.abs() ** (1.0 / 3.0)
        return ((u - self.B) / self.D * self.n - 1).clamp(0.0, self.T)

    def __repr__(self) -> str:
        return f"ContinuousScaledLinear(beta_start={self.beta_start:g}, beta_end={self.beta_end:g}, N={self.n})"


class FlowMatchingSchedule(NoiseSchedule):
    """The rectified-flow (flow-matching) path: ``sigma = tau / N``, ``alpha = 1 - sigma``, ``tau in [0, N]``.

    The model timestep is diffusers' ``FlowMatchEulerDiscreteScheduler`` one (``timestep = sigma * N``). Both
    ends are singular in half-log-SNR: ``lam = -inf`` at ``tau = N`` (``alpha = 0``) and ``+inf`` at ``tau = 0``
    (``sigma = 0``); ``alpha`` and ``sigma`` themselves are exact there, and solvers treat those intervals
    specially (see :mod:`diffinv.fields`). Not tied to ``alphas_cumprod`` (it has none).
    """

    def __init__(self, num_train_timesteps: int = 1000):
        if isinstance(num_train_timesteps, bool) or int(num_train_timesteps) < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
        self.n = int(num_train_timesteps)
        self.alphas_cumprod = None

    @property
    def T(self) -> float:
        return float(self.n)

    @property
    def is_flow(self) -> bool:
        return True

    def sigma(self, t: Any) -> Tensor:
        return self._check_t(t) / self.n

    def alpha(self, t: Any) -> Tensor:
        return 1.0 - self.sigma(t)

    def log_alpha(self, t: Any) -> Tensor:
        return torch.log1p(-self.sigma(t))

    def lam(self, t: Any) -> Tensor:
        s = self.sigma(t)
        return torch.log1p(-s) - torch.log(s)

    def chi(self, t: Any) -> Tensor:
        s = self.sigma(t)
        return s / (1.0 - s)  # +inf at alpha = 0

    def d_log_alpha(self, t: Any) -> Tensor:
        return -1.0 / (self.n - self._check_t(t))  # -inf at alpha = 0

    def d_alpha(self, t: Any) -> Tensor:
        """``d alpha / d tau`` (constant, finite at both ends)."""
        return torch.full_like(self._check_t(t), -1.0 / self.n)

    def d_sigma(self, t: Any) -> Tensor:
        """``d sigma / d tau``."""
        return torch.full_like(self._check_t(t), 1.0 / self.n)

    def timestep_of_lam(self, lam: Any) -> Tensor:
        lam = _as_f64(lam)
        if torch.isnan(lam).any():
            raise ValueError("lambda is NaN")
        return self.n * torch.sigmoid(-lam)

    def timestep_of_chi(self, chi: Any) -> Tensor:
        chi = _as_f64(chi)
        if torch.isnan(chi).any() or (chi < 0).any():
            raise ValueError("sigma/alpha must be >= 0")
        return torch.where(torch.isinf(chi), torch.full_like(chi, float(self.n)), self.n * chi / (1.0 + chi))

    def __repr__(self) -> str:
        return f"FlowMatchingSchedule(N={self.n})"


def scheduler_timesteps(scheduler: Any, steps: int, **set_timesteps_kwargs: Any) -> Tensor:
    """A diffusers scheduler's own grid for ``steps`` steps, as our timesteps (generation order, ending at 0).

    For ``FlowMatchEulerDiscreteScheduler`` these are its ``sigmas * num_train_timesteps`` (its shift, and FLUX's
    resolution-dependent dynamic shift via ``mu=...`` in ``set_timesteps_kwargs``, are choices of this grid);
    for DDPM-type schedulers its ``timesteps`` followed by 0.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    scheduler.set_timesteps(steps, **set_timesteps_kwargs)
    if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
        grid = scheduler.sigmas.detach().to(torch.float64) * float(scheduler.config.num_train_timesteps)
    else:
        grid = scheduler.timesteps.detach().to(torch.float64)
        if grid[-1] > 0:
            grid = torch.cat([grid, grid.new_zeros(1)])
    return grid


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
    scheduler: Any = None,
    **set_timesteps_kwargs: Any,
) -> Tensor:
    """Timesteps for ``steps`` solver steps, generation order, from ``start`` (default ``T``) to ``end``.

    ``spacing``: ``"lambda"`` uniform in half-log-SNR (the paper's default), ``"time"`` uniform in
    model timestep, ``"sigma"`` uniform in ``sigma/alpha``, ``"scheduler"`` the given diffusers
    ``scheduler``'s own grid (:func:`scheduler_timesteps`; ``start``/``end`` must be left at their defaults).
    Returns ``steps + 1`` float64 timesteps. On a flow-matching schedule ``lambda`` and ``sigma/alpha`` are
    infinite at the ends: ``"lambda"`` needs ``0 < end < start < T`` and ``"sigma"`` needs ``start < T``.
    """
    if spacing == "scheduler":
        if scheduler is None:
            raise ValueError('spacing="scheduler" needs the pipeline scheduler (scheduler=...)')
        if start is not None or end != 0.0:
            raise ValueError('spacing="scheduler" takes the scheduler\'s own grid: start/end cannot be set')
        return check_grid(schedule, scheduler_timesteps(scheduler, steps, **set_timesteps_kwargs))
    if scheduler is not None or set_timesteps_kwargs:
        raise ValueError('scheduler and set_timesteps options are only used with spacing="scheduler"')
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    start = schedule.T if start is None else float(start)
    if not (math.isfinite(start) and 0 <= end < start <= schedule.T):
        raise ValueError(f"start must satisfy {end:g} < start <= {schedule.T:g}, got {start!r}")
    if spacing in ("lambda", "sigma"):
        ends = schedule.lam(torch.tensor([start, end], dtype=torch.float64))
        if spacing == "sigma":
            ends = torch.exp(-ends)
        if not torch.isfinite(ends).all():
            what = "half-log-SNR" if spacing == "lambda" else "sigma/alpha"
            raise ValueError(
                f"{spacing!r} spacing needs a finite {what} at both ends, infinite at timestep"
                f" {start if not torch.isfinite(ends[0]) else end:g} of {schedule!r}; use spacing 'time' or"
                " 'scheduler', or start/end strictly inside the schedule"
            )
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
