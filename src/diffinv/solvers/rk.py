"""Explicit Runge-Kutta solvers: one generic step serves every tableau.

Inversion is the same explicit step with the step size negated, started from the later (cleaner)
time (reference/solvers.md §3.5): for EES schemes this undoes a forward step up to O(h^6) / O(h^8).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..fields import FORMS, Field, ODEForm, get_form
from ..tableaux import Tableau, get_tableau
from .base import Grid, Solver, State

__all__ = ["ExplicitRK", "StagePlan", "form_values", "interval_forms", "rk_increment", "stage_plan"]


class StagePlan(NamedTuple):
    """One interval in the direction of travel: the ODE form it is taken in, solver step ``h`` (signed), every
    stage's model timestep and ``(alpha, sigma)`` there, and the state weights ``w(t)`` at its start and end."""

    form: ODEForm
    h: float
    t: tuple[float, ...]
    coefficients: tuple[tuple[float, float], ...]
    w_from: float
    w_to: float


def rk_increment(tableau: Tableau, f: Callable[[int, Tensor], Tensor], y: Tensor, h: float) -> Tensor:
    """``h * sum_i b_i k_i`` with ``k_i = f(i, y + h * sum_{j<i} a_ij k_j)`` (reference §3.1).

    Each stage input and the result are accumulated in place in one fresh buffer (``torch.add`` with
    ``alpha``: one kernel and no temporary per term); ``y`` and the ``k_i`` are never written to.
    """
    ks: list[Tensor] = []
    for i, row in enumerate(tableau.a):
        yi = y
        for aij, kj in zip(row, ks):
            if aij != 0.0:
                yi = torch.add(yi, kj, alpha=h * aij) if yi is y else yi.add_(kj, alpha=h * aij)
        ks.append(f(i, yi))
    out = None
    for bi, ki in zip(tableau.b, ks):
        if bi != 0.0:
            out = torch.mul(ki, h * bi) if out is None else out.add_(ki, alpha=h * bi)
    assert out is not None  # weights sum to 1, so one is non-zero
    return out


def form_values(form: ODEForm, grid: Grid) -> tuple[list[float], list[float]]:
    """Solver time ``s(t_k)`` and state weight ``w(t_k)`` of ``form`` at every grid point, cached on the grid."""
    key = ("form-values", form.name)
    if key not in grid.cache:
        sched, ts = grid.schedule, grid.timesteps
        grid.cache[key] = (form.s_of_t(sched, ts).tolist(), form.weight(sched, ts).tolist())
    return grid.cache[key]


def interval_forms(form: ODEForm, grid: Grid) -> list[ODEForm]:
    """The form each grid interval is taken in: ``form``, or the ``"t"`` form where ``form`` is singular.

    On a flow-matching path the half-log-SNR is infinite at both ends (``sigma = 1`` and ``sigma = 0``),
    ``sigma/alpha`` at the noise end, and the states ``x/alpha``, ``x/sigma`` are singular where ``alpha`` or
    ``sigma`` vanish. An interval touching such a point is taken in the ``"t"`` form (``dx/dtau = alpha' x0 +
    sigma' eps``, finite everywhere; one Euler step there is diffusers' flow-Euler step), in both directions, so
    every solver reaches the clean end and exact solvers stay exact. On VP schedules no interval is singular.
    """
    key = ("interval-forms", form.name)
    if key not in grid.cache:
        s, w = form_values(form, grid)
        ok = [math.isfinite(si) and math.isfinite(wi) and wi != 0.0 for si, wi in zip(s, w)]
        grid.cache[key] = [form if ok[k] and ok[k + 1] else FORMS["t"] for k in range(grid.steps)]
    return grid.cache[key]


def stage_plan(form: ODEForm, grid: Grid, nodes: tuple[float, ...], backward: bool) -> list[StagePlan]:
    """Per-interval stage timesteps and weights for ``form`` on ``grid`` (each interval in its
    :func:`interval_forms` form), cached on the grid.

    Tableaus with a node outside [0, 1] (e.g. EES(2,7;x) for x > 0.17) put a stage of the first or last
    interval beyond the schedule's ends; the model is evaluated there at the nearest end of the schedule.
    The schedule is evaluated once for all grid points and once per form for all interior stages.
    """
    key = ("rk-plan", form.name, nodes, backward)
    if key not in grid.cache:
        sched = grid.schedule
        forms = interval_forms(form, grid)
        pairs = [(k + 1, k) if backward else (k, k + 1) for k in range(grid.steps)]  # (from, to) grid indices
        stage_t: list[tuple[float, ...] | None] = [None] * grid.steps
        for f in {f.name: f for f in forms}.values():
            s, _ = form_values(f, grid)
            ends = (f.s_of_t(sched, 0.0), f.s_of_t(sched, sched.T))
            lo, hi = min(ends), max(ends)
            mine = [k for k in range(grid.steps) if forms[k] is f]
            inner = [
                min(max(s[i] + c * (s[j] - s[i]), lo), hi)
                for i, j in (pairs[k] for k in mine)
                for c in nodes
                if c not in (0.0, 1.0)
            ]
            inner_t = iter(f.t_of_s(sched, torch.tensor(inner, dtype=torch.float64)).tolist() if inner else [])
            for k in mine:
                i, j = pairs[k]
                stage_t[k] = tuple(grid.t[i] if c == 0.0 else grid.t[j] if c == 1.0 else next(inner_t) for c in nodes)
        flat = torch.tensor([t for ts in stage_t for t in ts], dtype=torch.float64)
        coefs = iter(zip(sched.alpha(flat).tolist(), sched.sigma(flat).tolist()))
        plans = []
        for k, ((i, j), ts) in enumerate(zip(pairs, stage_t)):
            s, w = form_values(forms[k], grid)
            plans.append(StagePlan(forms[k], s[j] - s[i], ts, tuple(next(coefs) for _ in ts), w[i], w[j]))
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
        self.nodes = self.tableau.c  # computed by the tableau on every access
        self.order = self.tableau.order
        self._extra = extra

    def options(self) -> dict[str, Any]:
        return {"form": self.form.name, **self._extra}

    @property
    def reversal_order(self) -> int | None:
        return self.tableau.antisymmetric_order + 1

    def increment(self, field: Field, grid: Grid, k: int, y: Tensor, backward: bool = False) -> Tensor:
        """RK increment in state space over interval ``k``, from its start in the direction of travel."""
        plan = stage_plan(self.form, grid, self.nodes, backward)[k]
        ts, coefs, form = plan.t, plan.coefficients, plan.form
        return rk_increment(self.tableau, lambda i, yi: form.rhs(field, ts[i], yi, coefs[i]), y, plan.h)

    def _move(self, field: Field, grid: Grid, k: int, state: State, backward: bool) -> State:
        plan = stage_plan(self.form, grid, self.nodes, backward)[k]
        w_from, w_to = plan.w_from, plan.w_to
        y = state.x / w_from if w_from != 1.0 else state.x
        y = y + self.increment(field, grid, k, y, backward)
        return State(y * w_to if w_to != 1.0 else y)

    def step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        return self._move(field, grid, k, state, backward=False)

    def backward_step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        return self._move(field, grid, k, state, backward=True)
