"""DirectInversion / PnP Inversion (Ju et al., ICLR 2024) generalised to every solver.

The inversion runs at guidance 1 (the pivot trajectory ``x*_0 .. x*_N``, grid indices). For each generation step
``k`` the guided step from the pivot lands at ``step(s_k).x``; the stored difference ``d_k = x*_{k+1} - step(s_k).x``
is added to the *source* branch after every step of an edit, so that it walks exactly along the pivot and ends on
the source latent, while the target branches keep their own latents (and see the source through Prompt-to-Prompt).
This is cure-lab/PnPInversion's ``offset_calculate`` + ``latents[:1] + noise_loss[:1]``.

``s_k`` is the whole solver state the corrected source branch holds at index ``k``: its latent is on the pivot, and
whatever else the solver carries (DPM-Solver++(2M)'s previous data prediction, BDIA/BELM's previous latent, EDICT's,
Rex's or reversible Heun's second latent) is what the step before produced from the pivot. The offsets are computed
by walking the same states, so the correction is exact for every solver; only the latent is corrected (the other
components keep what the guided steps gave them).

:func:`check_one_step` is what null-text inversion needs: its optimised step must start from the latent alone.
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


def compute_offsets(solver: Solver, field: Any, grid: Any, pivot: list[Tensor], start: Any = None) -> Tensor:
    """``d_k = x*_{k+1} - step(s_k).x`` along the pivot (``pivot[k]`` at grid index ``k``).

    ``s_k`` is the generation state the source branch has at index ``k``: from ``start`` (default ``State(x*_0)``),
    each step's result with its latent put back on the pivot, so a state carrying more than the latent (a cached
    derivative, a second latent) holds exactly what the corrected source branch will hold.
    """
    from ..solvers import State

    state = State(pivot[0]) if start is None else start
    out = []
    for k in range(grid.steps):
        moved = solver.step(field, grid, k, state)
        out.append(pivot[k + 1] - moved.x)
        state = type(moved)(**{**vars(moved), "x": pivot[k + 1]})
    return torch.stack(out)
