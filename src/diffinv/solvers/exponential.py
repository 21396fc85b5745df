"""Exponential-integrator solvers on the discrete grid: DDIM and DPM-Solver++(2M), with their naive inversions.

DDIM (eta = 0) is first-order DPM-Solver / DPM-Solver++ and explicit Euler in ``(sigma/alpha, x/alpha)``
(reference/solvers.md §5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..fields import Field
from .base import Grid, Solver, State

__all__ = ["DDIM", "DPMSolverPP2M", "MultistepState", "ddim_step", "ddim_update"]

INVERSION_TIMESTEPS = ("current", "target")


def ddim_update(grid: Grid, i: int, j: int, x: Tensor, eps: Tensor) -> Tensor:
    """The DDIM map of latent ``x`` with noise estimate ``eps`` from grid index ``i`` to index ``j``.

    ``x_j = (a_j / a_i) x + (s_j - s_i a_j / a_i) eps``; valid in either direction.
    """
    ratio = grid.alpha[j] / grid.alpha[i]
    return ratio * x + (grid.sigma[j] - grid.sigma[i] * ratio) * eps


def ddim_step(field: Field, grid: Grid, k: int, x: Tensor) -> Tensor:
    """One DDIM generation step from grid index ``k`` with the model at ``t_k``.

    At the noise end of a flow path (``alpha_k = 0``) it is ``alpha_{k+1} x0 + sigma_{k+1} eps``, which is
    diffusers' flow-Euler step ``x + (sigma_{k+1} - sigma_k) v``: the velocity is kept, nothing divides by alpha.
    """
    if grid.alpha[k] == 0.0:
        eps, x0 = field.eps_x0(x, grid.t[k], (grid.alpha[k], grid.sigma[k]))
        return grid.alpha[k + 1] * x0 + grid.sigma[k + 1] * eps
    return ddim_update(grid, k, k + 1, x, field.eps(x, grid.t[k]))


class DDIM(Solver):
    """DDIM (Song et al. 2021), eta = 0: order 1, 1 model call per step, not exactly reversible.

    Inversion is naive DDIM inversion. ``inversion_timestep="current"`` evaluates the model at the
    latent's own (cleaner) timestep, as the BELM and Rex code and our RK inversion do; ``"target"``
    at the noisier target timestep, as diffusers' ``DDIMInverseScheduler`` and null-text inversion do.
    """

    name = "ddim"
    reference_spacing = "time"

    def __init__(self, inversion_timestep: str = "current"):
        if inversion_timestep not in INVERSION_TIMESTEPS:
            raise ValueError(
                f"inversion_timestep must be one of {', '.join(INVERSION_TIMESTEPS)}, got {inversion_timestep!r}"
            )
        self.inversion_timestep = inversion_timestep

    def options(self) -> dict[str, Any]:
        return {"inversion_timestep": self.inversion_timestep}

    @property
    def reversal_order(self) -> int | None:
        return 2

    def step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        return State(ddim_step(field, grid, k, state.x))

    def backward_step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        t_eval = grid.t[k + 1] if self.inversion_timestep == "current" else grid.t[k]
        if self.inversion_timestep == "target" and grid.alpha[k] == 0.0:
            eps, x0 = field.eps_x0(state.x, t_eval, (grid.alpha[k], grid.sigma[k]))
            return State(grid.alpha[k] * x0 + grid.sigma[k] * eps)  # x0 at alpha = 0 never divides
        return State(ddim_update(grid, k + 1, k, state.x, field.eps(state.x, t_eval)))


# diffusers' DPMSolverMultistepScheduler takes the last step at first order below this many steps
# (``lower_order_final``, with a final sigma > 0 as on our grids, which end at timestep 0).
LOWER_ORDER_FINAL_BELOW = 15


@dataclass
class MultistepState(State):
    """Latent plus the data prediction at the previous grid index in the direction of travel."""

    d_prev: Tensor | None = None


class DPMSolverPP2M(Solver):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095): order 2, 1 model call per step, not reversible.

    The multistep data-prediction update in half-log-SNR (reference §5; diffusers'
    ``multistep_dpm_solver_second_order_update``). The first step of a run is first order (no history),
    and so is the last when the grid has fewer than 15 steps (diffusers' ``lower_order_final``).
    Inversion runs the same formula towards noise with its own history; the model is evaluated at
    the latent's own timestep, as in naive DDIM inversion.
    """

    name = "dpmpp_2m"
    reference_spacing = "time"
    order = 2

    @property
    def reversal_order(self) -> int | None:
        return 3  # per second-order step; the first-order first/last steps add O(h^2) once

    def init_state(self, x: Tensor, grid: Grid) -> State:
        return MultistepState(x)

    def init_inversion(self, x: Tensor, grid: Grid) -> State:
        return MultistepState(x)

    def to_generation(self, state: State, grid: Grid) -> State:
        return MultistepState(state.x)  # the inversion's history runs the other way

    def step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        return self._update(field, grid, k, k + 1, k - 1, state, last=k + 1 == grid.steps)

    def backward_step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        return self._update(field, grid, k + 1, k, k + 2, state, last=k == 0)

    def _update(self, field: Field, grid: Grid, i: int, j: int, before: int, state: State, last: bool) -> State:
        """From grid index ``i`` to ``j``; ``before`` is the index of ``state.d_prev``, if any."""
        d_prev = getattr(state, "d_prev", None)
        lams = (grid.lam[i], grid.lam[j]) + ((grid.lam[before],) if d_prev is not None else ())
        if not all(map(math.isfinite, lams)):
            # An end of a flow path (lambda = -inf at alpha = 0, +inf at sigma = 0): the first-order step's limit,
            # x_j = alpha_j x0 + sigma_j eps, as diffusers takes it (its second-order term vanishes there).
            eps, d = field.eps_x0(state.x, grid.t[i], (grid.alpha[i], grid.sigma[i]))
            return MultistepState(grid.alpha[j] * d + grid.sigma[j] * eps, d_prev=d)
        d = field.x0(state.x, grid.t[i], (grid.alpha[i], grid.sigma[i]))
        h = grid.lam[j] - grid.lam[i]
        corrected = d
        if d_prev is not None and not (last and grid.steps < LOWER_ORDER_FINAL_BELOW):
            r = (grid.lam[i] - grid.lam[before]) / h
            corrected = d + (0.5 / r) * (d - d_prev)
        x = (grid.sigma[j] / grid.sigma[i]) * state.x - (grid.alpha[j] * math.expm1(-h)) * corrected
        return MultistepState(x, d_prev=d)
