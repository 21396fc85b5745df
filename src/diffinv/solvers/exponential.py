"""Exponential-integrator solvers on the discrete grid: DDIM and its naive inversion.

DDIM (eta = 0) is first-order DPM-Solver / DPM-Solver++ and explicit Euler in ``(sigma/alpha, x/alpha)``
(reference/solvers.md §5).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..fields import Field
from .base import Grid, Solver, State

__all__ = ["DDIM", "ddim_update"]

INVERSION_TIMESTEPS = ("current", "target")


def ddim_update(grid: Grid, i: int, j: int, x: Tensor, eps: Tensor) -> Tensor:
    """The DDIM map of latent ``x`` with noise estimate ``eps`` from grid index ``i`` to index ``j``.

    ``x_j = (a_j / a_i) x + (s_j - s_i a_j / a_i) eps``; valid in either direction.
    """
    ratio = grid.alpha[j] / grid.alpha[i]
    return ratio * x + (grid.sigma[j] - grid.sigma[i] * ratio) * eps


class DDIM(Solver):
    """DDIM (Song et al. 2021), eta = 0: order 1, 1 model call per step, not exactly reversible.

    Inversion is naive DDIM inversion. ``inversion_timestep="current"`` evaluates the model at the
    latent's own (cleaner) timestep, as the BELM and Rex code and our RK inversion do; ``"target"``
    at the noisier target timestep, as diffusers' ``DDIMInverseScheduler`` and null-text inversion do.
    """

    name = "ddim"

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
        return State(ddim_update(grid, k, k + 1, state.x, field.eps(state.x, grid.t[k])))

    def backward_step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        t_eval = grid.t[k + 1] if self.inversion_timestep == "current" else grid.t[k]
        return State(ddim_update(grid, k + 1, k, state.x, field.eps(state.x, t_eval)))
