"""Algebraically reversible one-step solvers: the McCallum-Foster wrapper, Rex and reversible Heun.

All step in an ODE form's state space ``Y = x / w(t)`` (:mod:`diffinv.fields`) and keep their
auxiliary latent in ``x`` units, so ``state.x`` is always the image latent (reference/solvers.md §4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..fields import Field, ODEForm, get_form
from ..tableaux import Tableau
from .base import Grid, Solver, State
from .rk import ExplicitRK, form_values, interval_forms

__all__ = ["REX_MODES", "CoupledState", "McCallumFoster", "ReversibleHeun", "ReversibleHeunState", "Rex"]

# Rex's prediction_type -> the ODE form of its base step (reference §4.3).
REX_MODES = {"noise": "sigma", "data": "gamma"}


def _weights(form: ODEForm, grid: Grid, k: int) -> tuple[float, float]:
    """``w(t_k), w(t_{k+1})`` of ``Y = x / w`` in the form interval ``k`` is taken in (:func:`interval_forms`)."""
    _, w = form_values(interval_forms(form, grid)[k], grid)
    return w[k], w[k + 1]


@dataclass
class CoupledState(State):
    """The McCallum-Foster pair ``(y, z)`` as latents: ``x`` is ``y`` (the output), ``z`` its partner."""

    z: Tensor


class McCallumFoster(Solver):
    """McCallum-Foster reversible wrapper (arXiv 2410.11648) around an explicit RK step ``Phi = id + Psi``.

    Exactly reversible, 2 base steps (``2 x stages`` model calls) per step, the base method's order.
    With coupling ``c`` in (0, 1], in state space (reference §4.1; diffrax ``UReversible``)::

        y' = c y + (1 - c) z + Psi_h(s_k, z)        z' = z - Psi_{-h}(s_{k+1}, y')

    Both latents start equal. The reference code has no default base; ours is EES(2,5).
    """

    name = "mf"
    exact = True
    reference_spacing = "time"

    def __init__(self, base: str | Tableau = "ees25", coupling: float = 0.999, form: str = "lambda-x"):
        self.coupling = self._check_fraction("coupling", coupling)
        self.rk = ExplicitRK(base, form=form, name=base if isinstance(base, str) else None)
        self.nfe_per_step = 2 * self.rk.nfe_per_step
        self.order = self.rk.order

    @property
    def base(self) -> str:
        return self.rk.name

    def options(self) -> dict[str, Any]:
        return {"base": self.base, "coupling": self.coupling, "form": self.rk.form.name}

    def init_state(self, x: Tensor, grid: Grid) -> State:
        return CoupledState(x, x.clone())

    def init_inversion(self, x: Tensor, grid: Grid) -> State:
        return CoupledState(x, x.clone())

    def step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        w0, w1 = _weights(self.rk.form, grid, k)
        c = self.coupling
        y, z = state.x / w0, state.z / w0
        y = c * y + (1 - c) * z + self.rk.increment(field, grid, k, z)
        z = z - self.rk.increment(field, grid, k, y, backward=True)
        return CoupledState(y * w1, z * w1)

    def backward_step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        w0, w1 = _weights(self.rk.form, grid, k)
        c = self.coupling
        y, z = state.x / w1, state.z / w1
        z = z + self.rk.increment(field, grid, k, y, backward=True)
        y = (y - (1 - c) * z - self.rk.increment(field, grid, k, z)) / c
        return CoupledState(y * w0, z * w0)


class Rex(McCallumFoster):
    """Rex (Blasingame & Liu, arXiv 2502.08834): McCallum-Foster coupling of an RK step in Rex's variables.

    ``mode="noise"``: time ``sigma/alpha``, state ``x/alpha``, stages evaluate eps (the "sigma" form);
    ``mode="data"``: time ``alpha/sigma``, state ``x/sigma``, stages evaluate x0 (the "gamma" form).
    With the Euler tableau in noise mode this is McCallum-Foster-coupled DDIM. Our schedule inverts
    ``sigma/alpha`` on the discrete schedule, not with Rex's closed-form continuous one.
    """

    name = "rex"

    def __init__(self, base: str | Tableau = "euler", mode: str = "noise", coupling: float = 0.999):
        if mode not in REX_MODES:
            raise ValueError(f"Rex mode must be one of {', '.join(REX_MODES)}, got {mode!r}")
        self.mode = mode
        super().__init__(base, coupling, form=REX_MODES[mode])

    def options(self) -> dict[str, Any]:
        return {"base": self.base, "mode": self.mode, "coupling": self.coupling}


@dataclass
class ReversibleHeunState(State):
    """Reversible Heun's ``(y, z_hat)`` as latents, and the cached slope ``f(s, z_hat / w)`` in state space."""

    z: Tensor
    f: Tensor | None = None


class ReversibleHeun(Solver):
    """Reversible Heun (Kidger, Foster, Li, Lyons 2021; torchsde ``reversible_heun.py``).

    Order 2, 1 model call per step (the slope is cached in the state), exactly reversible::

        z' = 2 y - z + h f(s_k, z)        y' = y + h/2 (f(s_k, z) + f(s_{k+1}, z'))
    """

    name = "reversible_heun"
    exact = True
    reference_spacing = "time"
    order = 2

    def __init__(self, form: str = "lambda-x"):
        self.form = get_form(form)

    def options(self) -> dict[str, Any]:
        return {"form": self.form.name}

    def init_state(self, x: Tensor, grid: Grid) -> State:
        return ReversibleHeunState(x, x.clone())

    def init_inversion(self, x: Tensor, grid: Grid) -> State:
        return ReversibleHeunState(x, x.clone())

    def to_generation(self, state: State, grid: Grid) -> State:
        # The cached slope belongs to the inversion's model; an edit must evaluate its own (one extra call).
        # With the same model the recomputed slope is the same number, so reconstruction stays exact.
        return ReversibleHeunState(state.x, state.z, None)

    def _slope(self, field: Field, grid: Grid, k: int, i: int, z: Tensor, cached: Tensor | None) -> Tensor:
        return self._rhs(field, grid, k, i, z) if cached is None else cached

    def _rhs(self, field: Field, grid: Grid, k: int, i: int, z: Tensor) -> Tensor:
        """The slope at grid index ``i`` in the form of interval ``k``."""
        return interval_forms(self.form, grid)[k].rhs(field, grid.t[i], z, (grid.alpha[i], grid.sigma[i]))

    def _h(self, grid: Grid, k: int) -> float:
        s, _ = form_values(interval_forms(self.form, grid)[k], grid)
        return s[k + 1] - s[k]

    def _keep(self, grid: Grid, k: int, other: int) -> bool:
        """Whether interval ``k``'s cached slope serves interval ``other`` (same form; a flow path's end
        intervals are taken in another form, :func:`~.rk.interval_forms`, and then cost one more call)."""
        forms = interval_forms(self.form, grid)
        return not 0 <= other < grid.steps or forms[other] is forms[k]

    def step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        w0, w1 = _weights(self.form, grid, k)
        h = self._h(grid, k)
        y, z = state.x / w0, state.z / w0
        f = self._slope(field, grid, k, k, z, getattr(state, "f", None))
        z = 2 * y - z + h * f
        f_next = self._rhs(field, grid, k, k + 1, z)
        y = y + (0.5 * h) * (f + f_next)
        return ReversibleHeunState(y * w1, z * w1, f_next if self._keep(grid, k, k + 1) else None)

    def backward_step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        w0, w1 = _weights(self.form, grid, k)
        h = self._h(grid, k)
        y, z = state.x / w1, state.z / w1
        f_next = self._slope(field, grid, k, k + 1, z, getattr(state, "f", None))
        z = 2 * y - z - h * f_next
        f = self._rhs(field, grid, k, k, z)
        y = y - (0.5 * h) * (f + f_next)
        return ReversibleHeunState(y * w0, z * w0, f if self._keep(grid, k, k - 1) else None)
