"""Explicit Runge-Kutta solvers: one generic step serves every tableau.

Inversion is the same explicit step with the step size negated, started from the later (cleaner)
time (reference/solvers.md §3.5): for EES schemes this undoes a forward step up to O(h^6) / O(h^8).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..fields import Field, ODEForm, get_form
from ..tableaux import Tableau, get_tableau
from .base import Grid, Solver, State

__all__ = ["ExplicitRK", "StagePlan", "rk_increment"]

# Per interval: solver step h (signed), the model timestep of every stage, and the state weights
# w(t) at the interval's start and end, in the direction of travel.
StagePlan = tuple[float, tuple[float, ...], float, float]


def rk_increment(tableau: Tableau, f: Callable[[int, Tensor], Tensor], y: Tensor, h: float) -> Tensor:
    """``h * sum_i b_i k_i`` with ``k_i = f(i, y + h * sum_{j<i} a_ij k_j)`` (reference §3.1)."""
    ks: list[Tensor] = []
    for i, row in enumerate(tableau.a):
        yi = y
        for aij, kj in zip(row, ks):
            if aij != 0.0:
                yi = yi + (h * aij) * kj
        ks.append(f(i, yi))
    out = None
    for bi, ki in zip(tableau.b, ks):
        if bi != 0.0:
            out = (h * bi) * ki if out is None else out + (h * bi) * ki
    assert out is not None  # weights sum to 1, so one is non-zero
    return out


def stage_plan(form: ODEForm, grid: Grid, nodes: tuple[float, ...], backward: bool) -> list[StagePlan]:
    """Per-interval stage timesteps and weights for ``form`` on ``grid``, cached on the grid.

    Tableaus with a node outside [0, 1] (e.g. EES(2,7;x) for x > 0.17) put a stage of the first or last
    interval beyond the schedule's ends; the model is evaluated there at the nearest end of the schedule.
    """
    key = ("rk-plan", form.name, nodes, backward)
    if key not in grid.cache:
        sched = grid.schedule
        ends = (form.s_of_t(sched, 0.0), form.s_of_t(sched, sched.T))
        lo, hi = min(ends), max(ends)
        plans: list[StagePlan] = []
        for k in range(grid.steps):
            t_from, t_to = (grid.t[k + 1], grid.t[k]) if backward else (grid.t[k], grid.t[k + 1])
            s_from, s_to = form.s_of_t(sched, t_from), form.s_of_t(sched, t_to)
            h = s_to - s_from
            ts = tuple(
                t_from if c == 0.0 else t_to if c == 1.0 else form.t_of_s(sched, min(max(s_from + c * h, lo), hi))
                for c in nodes
            )
            plans.append((h, ts, form.weight(sched, t_from), form.weight(sched, t_to)))
        grid.cache[key] = plans
    return grid.cache[key]


class ExplicitRK(Solver):
    """An explicit Runge-Kutta method given by its tableau, in one of the ODE forms.

    Model calls per step = number of stages. Not exactly reversible: the round trip
    ``Phi_{-h}(Phi_h(y)) - y`` is ``O(h^{q+1})`` with ``q`` the tableau's antisymmetric order.
    """

    exact = False

    def __init__(self, tableau: Tableau | str, form: str = "lambda-x", name: str | None = None, **extra: Any):
        self.tableau = get_tableau(tableau)
        self.form = get_form(form)
        self.name = name or self.tableau.name.lower()
        self.nfe_per_step = self.tableau.stages
        self.order = self.tableau.order
        self._extra = extra

    def options(self) -> dict[str, Any]:
        return {"form": self.form.name, **self._extra}

    @property
    def reversal_order(self) -> int | None:
        return self.tableau.antisymmetric_order + 1

    def increment(self, field: Field, grid: Grid, k: int, y: Tensor, backward: bool = False) -> Tensor:
        """RK increment in state space over interval ``k``, from its start in the direction of travel."""
        h, ts, _, _ = stage_plan(self.form, grid, self.tableau.c, backward)[k]
        return rk_increment(self.tableau, lambda i, yi: self.form.rhs(field, ts[i], yi), y, h)

    def _move(self, field: Field, grid: Grid, k: int, state: State, backward: bool) -> State:
        _, _, w_from, w_to = stage_plan(self.form, grid, self.tableau.c, backward)[k]
        y = state.x / w_from if w_from != 1.0 else state.x
        y = y + self.increment(field, grid, k, y, backward)
        return State(y * w_to if w_to != 1.0 else y)

    def step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        return self._move(field, grid, k, state, backward=False)

    def backward_step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        return self._move(field, grid, k, state, backward=True)
