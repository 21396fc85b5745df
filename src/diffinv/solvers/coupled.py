"""Exactly reversible DDIM couplings on the discrete grid: EDICT, BDIA and O-BELM (reference/solvers.md §6-§8).

All three are built from DDIM maps between grid indices (:func:`~.exponential.ddim_update`), so every
update can be undone algebraically: inverting with a model and generating with the same model
reconstructs the clean latent to round-off. The output (image) latent is always ``state.x``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..fields import Field
from .base import Grid, Solver, State
from .exponential import ddim_step, ddim_update


def _require_alpha(solver: Solver, grid: Grid) -> None:
    """Refuse a grid through ``alpha = 0`` (a flow path's noise end), where the coupling is not invertible."""
    if 0.0 in grid.alpha:
        raise ValueError(
            f"{solver.name} is not invertible where alpha = 0 (timestep {grid.schedule.T:g} of a flow-matching"
            " schedule): start the grid below it (start=, or drop the scheduler's first timestep)"
        )


__all__ = ["BDIA", "BELM", "EDICT", "EDICTState", "TwoStepDDIM", "TwoStepState"]


@dataclass
class EDICTState(State):
    """EDICT's two coupled latents at one grid index; ``x`` is the image latent, ``y`` its partner."""

    y: Tensor


class EDICT(Solver):
    """EDICT (Wallace, Gokul, Naik, CVPR 2023): two coupled DDIM sequences and a mixing layer.

    Order 1, 2 model calls per step, exactly reversible. Per step ``k -> k+1`` (both calls at ``t_k``):
    ``x_i = DDIM(x, eps(y))``, ``y_i = DDIM(y, eps(x_i))``, then the mixing layer
    ``x' = p x_i + (1-p) y_i``, ``y' = p y_i + (1-p) x'``. With ``leapfrog`` (the official code's
    default) the roles of ``x`` and ``y`` in the two DDIM sub-steps swap on odd steps (counted from the
    first step of the grid); the mixing layer is never swapped.
    """

    name = "edict"
    exact = True
    reference_spacing = "time"
    nfe_per_step = 2

    def __init__(self, p: float = 0.93, leapfrog: bool = True):
        self.p = self._check_fraction("p", p)
        if not isinstance(leapfrog, bool):
            raise ValueError(f"leapfrog must be True or False, got {leapfrog!r}")
        self.leapfrog = leapfrog

    def options(self) -> dict[str, Any]:
        return {"p": self.p, "leapfrog": self.leapfrog}

    def init_state(self, x: Tensor, grid: Grid) -> State:
        _require_alpha(self, grid)
        return EDICTState(x, x.clone())

    def init_inversion(self, x: Tensor, grid: Grid) -> State:
        _require_alpha(self, grid)
        return EDICTState(x, x.clone())

    def _swapped(self, k: int) -> bool:
        return self.leapfrog and k % 2 == 1

    def step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        t = grid.t[k]

        def forward(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            u = ddim_update(grid, k, k + 1, u, field.eps(v, t))
            return u, ddim_update(grid, k, k + 1, v, field.eps(u, t))

        if self._swapped(k):
            y, x = forward(state.y, state.x)
        else:
            x, y = forward(state.x, state.y)
        p = self.p
        x = p * x + (1 - p) * y
        return EDICTState(x, p * y + (1 - p) * x)

    def backward_step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        t, p = grid.t[k], self.p
        y = (state.y - (1 - p) * state.x) / p
        x = (state.x - (1 - p) * y) / p

        def backward(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            """Undo ``forward(u, v)``: ``v`` was updated last, so it is restored first."""
            v = ddim_update(grid, k + 1, k, v, field.eps(u, t))
            return ddim_update(grid, k + 1, k, u, field.eps(v, t)), v

        if self._swapped(k):
            y, x = backward(y, x)
        else:
            x, y = backward(x, y)
        return EDICTState(x, y)


@dataclass
class TwoStepState(State):
    """A latent with its neighbour on the grid: ``noisier`` (index k-1) when generating, ``cleaner`` (k+1)
    when inverting. An inversion ends with ``(x_0, cleaner=x_1)``: the pair generation starts from."""

    noisier: Tensor | None = None
    cleaner: Tensor | None = None


class TwoStepDDIM(Solver):
    """Two-step exactly invertible DDIM schemes (BDIA, O-BELM), with ``e = eps(x_k, t_k)``:

    ``x_{k+1} = DDIM_{k->k+1}(x_k, e) + c_k (x_{k-1} - DDIM_{k->k-1}(x_k, e))``,
    inverted by ``x_{k-1} = (x_{k+1} - DDIM_{k->k+1}(x_k, e)) / c_k + DDIM_{k->k-1}(x_k, e)``.
    Subclasses give ``c_k``. The first generation step from a plain latent is a DDIM step; the first
    inversion step (from the clean latent) is a DDIM inversion step with the model at the clean
    timestep, and the inversion returns the pair ``(x_0, x_1)``, from which generation takes ``x_1``
    as its first step without a model call (as the reference codes do).
    """

    exact = True
    reference_spacing = "time"
    nfe_per_step = 1

    def coefficient(self, grid: Grid, k: int) -> float:
        """``c_k``, the weight of ``x_{k-1}`` in the step from index ``k``."""
        raise NotImplementedError

    def init_state(self, x: Tensor, grid: Grid) -> State:
        return TwoStepState(x)

    def init_inversion(self, x: Tensor, grid: Grid) -> State:
        return TwoStepState(x)

    def step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        x = state.x
        if getattr(state, "cleaner", None) is not None:  # the inverted pair already holds x_{k+1}
            return TwoStepState(state.cleaner, noisier=x)
        noisier = getattr(state, "noisier", None)
        if noisier is None:  # the first step from a plain latent is a DDIM step (also at alpha = 0)
            return TwoStepState(ddim_step(field, grid, k, x), noisier=x)
        e = field.eps(x, grid.t[k])
        nxt = ddim_update(grid, k, k + 1, x, e)
        nxt = nxt + self.coefficient(grid, k) * (noisier - ddim_update(grid, k, k - 1, x, e))
        return TwoStepState(nxt, noisier=x)

    def backward_step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        j, x = k + 1, state.x
        e = field.eps(x, grid.t[j])
        prev = ddim_update(grid, j, k, x, e)
        cleaner = getattr(state, "cleaner", None)
        if cleaner is not None:
            prev = prev + (cleaner - ddim_update(grid, j, j + 1, x, e)) / self.coefficient(grid, j)
        return TwoStepState(prev, cleaner=x)


class BDIA(TwoStepDDIM):
    """BDIA-DDIM (Zhang, Lewis, Kleijn, ECCV 2024): order 1 (2 at gamma = 1), 1 model call per step, exactly reversible.

    ``x_{k+1} = gamma x_{k-1} + DDIM_{k->k+1}(x_k) - gamma DDIM_{k->k-1}(x_k)``, ``c_k = gamma``.
    ``gamma`` weights ``x_{k-1}`` as in the official code (its current README swaps gamma and 1 - gamma);
    ``gamma = 1`` is the symmetric leapfrog form. Default 0.96 as in the BELM and Rex editing scripts.
    """

    name = "bdia"

    def __init__(self, gamma: float = 0.96):
        try:
            g = float(gamma)
        except (TypeError, ValueError):
            raise ValueError(f"gamma must be a positive number, got {gamma!r}") from None
        if not (g > 0 and g < float("inf")):
            raise ValueError(f"gamma must be positive and finite, got {gamma!r}")
        self.gamma = g
        self.order = 2 if g == 1.0 else 1  # the (1 - gamma) x_k term is a first-order perturbation

    def options(self) -> dict[str, Any]:
        return {"gamma": self.gamma}

    def coefficient(self, grid: Grid, k: int) -> float:
        return self.gamma


class BELM(TwoStepDDIM):
    """O-BELM (Wang et al., NeurIPS 2024), the LTE-optimal 2-step bidirectional explicit linear multistep
    method in ``(chi, x/alpha)``, ``chi = sigma/alpha``: order 2, 1 model call per step, exactly reversible.

    In ``x/alpha`` it is the two-step DDIM scheme with ``c_k = (d2/d1)^2 alpha_{k+1}/alpha_{k-1}``,
    ``d1 = chi_k - chi_{k-1}``, ``d2 = chi_{k+1} - chi_k`` (reference §8, rearranged).
    """

    name = "belm"
    order = 2

    def init_state(self, x: Tensor, grid: Grid) -> State:
        _require_alpha(self, grid)
        return super().init_state(x, grid)

    def init_inversion(self, x: Tensor, grid: Grid) -> State:
        _require_alpha(self, grid)
        return super().init_inversion(x, grid)

    def coefficient(self, grid: Grid, k: int) -> float:
        chi = [grid.sigma[i] / grid.alpha[i] for i in (k - 1, k, k + 1)]
        ratio = (chi[2] - chi[1]) / (chi[1] - chi[0])
        return ratio * ratio * grid.alpha[k + 1] / grid.alpha[k - 1]
