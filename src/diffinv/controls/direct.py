"""DirectInversion / PnP Inversion (Ju et al., ICLR 2024) generalised to any one-step solver.

The inversion runs at guidance 1 (the pivot trajectory ``x*_0 .. x*_N``, grid indices). For each generation step
``k`` the guided step from the pivot lands at ``step(x*_k)``; the stored difference ``d_k = x*_{k+1} - step(x*_k)``
is added to the *source* branch after every step of an edit, so that it walks exactly along the pivot and ends on
the source latent, while the target branches keep their own latents (and see the source through Prompt-to-Prompt).
This is cure-lab/PnPInversion's ``offset_calculate`` + ``latents[:1] + noise_loss[:1]``.

It needs a solver whose state is the latent alone (DDIM, every explicit Runge-Kutta method incl. EES): then
"being on the trajectory at grid index k" determines the next step. Two-step (BDIA, BELM), coupled (EDICT) and
reversible-pair (Rex, reversible Heun, McCallum-Foster) solvers carry a second state that the correction would
have to move as well, and they already reconstruct exactly, so the correction would be zero: they are refused.
Multistep DPM-Solver++(2M) carries the previous derivative and is refused for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..solvers import DDIM, ExplicitRK, Solver

__all__ = ["ONE_STEP_SOLVERS", "DirectOffsets", "check_one_step"]

ONE_STEP_SOLVERS = (DDIM, ExplicitRK)


def check_one_step(solver: Solver, method: str) -> None:
    """Refuse solvers whose state is more than the latent (see the module docstring)."""
    if not isinstance(solver, ONE_STEP_SOLVERS):
        raise ValueError(
            f"{method} needs a one-step solver whose state is the latent alone (ddim, euler, heun, rk4, ees25, "
            f"ees27, ...); {solver.name} carries a second state (two-step, coupled or multistep), "
            "and exactly reversible solvers reconstruct without it"
        )


@dataclass
class DirectOffsets:
    """The per-step differences ``d_k`` ``(steps, images, C, h, w)`` and a callback adding them to source rows."""

    offsets: Tensor

    def callback(self, rows: list[int] | None = None, group: int = 1) -> Any:
        """Solve-loop callback: add ``d_k`` to every ``group``-th row (the source branches), after step ``k``."""

        def add(at: int, t: float, state: Any) -> Any:
            d = self.offsets[at - 1].to(state.x.device, state.x.dtype)
            x = state.x.clone()
            x[::group] = x[::group] + d
            return type(state)(**{**vars(state), "x": x})

        return add


def compute_offsets(solver: Solver, field: Any, grid: Any, pivot: list[Tensor]) -> Tensor:
    """``d_k = x*_{k+1} - step(x*_k)`` along the pivot trajectory (``pivot[k]`` at grid index ``k``)."""
    from ..solvers import State

    out = []
    for k in range(grid.steps):
        moved = solver.step(field, grid, k, State(pivot[k])).x
        out.append(pivot[k + 1] - moved)
    return torch.stack(out)
