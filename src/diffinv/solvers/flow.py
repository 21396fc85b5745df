"""Rectified-flow inversion baselines: RF-Solver, FireFlow and RF-Inversion (flow-matching schedules only).

All three step in the model timestep ``tau = N sigma`` with the velocity ``dx/dtau = v / N``, ``v = eps - x0``
(the ``"t"`` form of :mod:`diffinv.fields` on a flow path, finite at both ends), exactly as their official
FLUX code steps in ``sigma`` with the transformer's velocity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..fields import FORMS, Field
from ..tableaux import MIDPOINT
from .base import Grid, Solver, State
from .rk import ExplicitRK

__all__ = ["FireFlow", "FireFlowState", "RFInversion", "RFInversionState", "RFSolver", "require_flow"]

T_FORM = FORMS["t"]


def require_flow(solver: Solver, grid: Grid) -> None:
    """Refuse a schedule that is not a flow-matching path (these methods are defined on rectified flow only)."""
    if not grid.schedule.is_flow:
        raise ValueError(
            f"{solver.name} is a rectified-flow solver: it needs a flow-matching schedule, got {grid.schedule!r}"
        )


def _velocity(field: Field, grid: Grid, i: int, x: Tensor) -> Tensor:
    """``dx/dtau`` at grid index ``i``."""
    return T_FORM.rhs(field, grid.t[i], x, (grid.alpha[i], grid.sigma[i]))


class RFSolver(ExplicitRK):
    """RF-Solver-2 (Wang et al., "Taming Rectified Flow for Inversion and Editing", ICML 2025;
    github.com/wangjiangshan0725/RF-Solver-Edit ``denoise``): the second-order Taylor step

        x' = x + h v(x, t) + h^2 / 2 * (v(x + h/2 v, t + h/2) - v(x, t)) / (h/2)

    with the derivative by a finite difference over half the step. Its two terms collapse to
    ``x + h v(x + h/2 v, t + h/2)``: the explicit midpoint rule in ``tau``, which is how it runs here.
    Order 2, 2 model calls per step; inversion is the same step from the cleaner end, as in the official code.
    """

    reference_spacing = "time"

    def __init__(self) -> None:
        super().__init__(MIDPOINT, form="t", name="rf_solver")

    def options(self) -> dict[str, Any]:
        return {}

    def init_state(self, x: Tensor, grid: Grid) -> State:
        require_flow(self, grid)
        return State(x)

    def init_inversion(self, x: Tensor, grid: Grid) -> State:
        require_flow(self, grid)
        return State(x)


@dataclass
class FireFlowState(State):
    """The latent and the midpoint velocity of the previous step, reused as this step's start velocity."""

    v: Tensor | None = None


class FireFlow(Solver):
    """FireFlow (Deng et al., "FireFlow: Fast Inversion of Rectified Flow for Image Semantic Editing",
    ICML 2025; github.com/HolmesShuan/FireFlow-Fast-Inversion-of-Rectified-Flow-for-Image-Semantic-Editing
    ``denoise_fireflow``): a midpoint step whose start velocity is the previous step's midpoint velocity::

        x_mid = x + h/2 v_prev        v_mid = v(x_mid, t + h/2)        x' = x + h v_mid        v_prev <- v_mid

    One model call per step after the first (which evaluates ``v(x, t)``), order 2, not exactly reversible.
    Inversion runs the same update from the clean end; each run starts without a cached velocity, as the
    official inversion and editing runs do.
    """

    name = "fireflow"
    order = 2
    nfe_per_step = 1
    reference_spacing = "time"

    @property
    def reversal_order(self) -> int | None:
        return 3

    def init_state(self, x: Tensor, grid: Grid) -> State:
        require_flow(self, grid)
        return FireFlowState(x)

    def init_inversion(self, x: Tensor, grid: Grid) -> State:
        require_flow(self, grid)
        return FireFlowState(x)

    def to_generation(self, state: State, grid: Grid) -> State:
        return FireFlowState(state.x)  # the edit's model gives its own first velocity

    def _move(self, field: Field, grid: Grid, i: int, j: int, state: State) -> State:
        x, h = state.x, grid.t[j] - grid.t[i]
        v = getattr(state, "v", None)
        if v is None:
            v = _velocity(field, grid, i, x)
        t_mid = grid.t[i] + 0.5 * h
        coefficients = (float(grid.schedule.alpha(t_mid)), float(grid.schedule.sigma(t_mid)))
        v_mid = T_FORM.rhs(field, t_mid, x + (0.5 * h) * v, coefficients)
        return FireFlowState(x + h * v_mid, v=v_mid)

    def step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        return self._move(field, grid, k, k + 1, state)

    def backward_step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        return self._move(field, grid, k + 1, k, state)


@dataclass
class RFInversionState(State):
    """The latent with RF-Inversion's two references: ``source`` (``y_0``, the clean latent the inversion
    started from; the generation's target) and ``noise`` (``y_1``, the inversion's target)."""

    source: Tensor | None = None
    noise: Tensor | None = None


class RFInversion(Solver):
    """RF-Inversion (Rout et al., "Semantic Image Inversion and Editing using Rectified Stochastic Differential
    Equations", ICLR 2025; github.com/LituRout/RF-Inversion and diffusers' community ``pipeline_flux_rf_inversion``):
    Euler steps of two controlled ODEs.

    Inversion (Algorithm 1, controlled forward ODE) pulls towards a noise sample ``y_1`` with strength
    ``gamma``: ``dx/dsigma = v + gamma ((y_1 - x) / (1 - sigma) - v)``. Generation (Algorithm 2, controlled
    reverse ODE) pulls towards the source latent ``y_0`` with strength ``eta`` on the steps
    ``int(start_timestep * n) <= i < min(int(stop_timestep * n), n)`` (``n`` grid steps) and follows ``v``
    elsewhere: ``dx/dsigma = v - eta ((y_0 - x) / sigma + v)``.

    The references fit the solver protocol without an extra argument: ``y_0`` is the clean latent
    :meth:`init_inversion` receives (the Editor's ``invert`` of the source image), kept in the state for the
    edit; ``y_1`` is drawn from ``seed`` (the official code draws it unseeded). Generation from a plain latent
    has no source: the ``eta`` term is off there (plain flow Euler). Defaults are the authors' example
    (``gamma=0.5``, ``eta=0.9``, ``start_timestep=0``, ``stop_timestep=7/28``, on 28 steps).
    The model and the references are taken at the grid's own sigmas (the official inversion loop evaluates the
    transformer at ``i/N`` whatever the shift; on an unshifted grid the two agree). Order 1, not reversible.
    """

    name = "rf_inversion"
    nfe_per_step = 1
    reference_spacing = "time"

    def __init__(
        self,
        gamma: float = 0.5,
        eta: float = 0.9,
        start_timestep: float = 0.0,
        stop_timestep: float = 0.25,
        seed: int = 0,
    ):
        for what, value in (("gamma", gamma), ("eta", eta), ("start_timestep", start_timestep)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
        if isinstance(stop_timestep, bool) or not isinstance(stop_timestep, (int, float)):
            raise ValueError(f"stop_timestep must be a number in [start_timestep, 1], got {stop_timestep!r}")
        if not start_timestep <= stop_timestep <= 1.0:
            raise ValueError(f"stop_timestep must be in [start_timestep, 1], got {stop_timestep!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.gamma, self.eta = float(gamma), float(eta)
        self.start_timestep, self.stop_timestep, self.seed = float(start_timestep), float(stop_timestep), seed

    def options(self) -> dict[str, Any]:
        return {
            "gamma": self.gamma,
            "eta": self.eta,
            "start_timestep": self.start_timestep,
            "stop_timestep": self.stop_timestep,
            "seed": self.seed,
        }

    def init_state(self, x: Tensor, grid: Grid) -> State:
        require_flow(self, grid)
        return RFInversionState(x)

    def init_inversion(self, x: Tensor, grid: Grid) -> State:
        require_flow(self, grid)
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype)
        return RFInversionState(x, source=x.clone(), noise=noise)

    def eta_at(self, grid: Grid, k: int) -> float:
        """The controller strength of generation step ``k`` (the official ``start``/``stop`` step window)."""
        n = grid.steps
        start, stop = int(self.start_timestep * n), min(int(self.stop_timestep * n), n)
        return self.eta if start <= k < stop else 0.0

    def step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        x = state.x
        r = _velocity(field, grid, k, x)
        source = getattr(state, "source", None)
        eta = self.eta_at(grid, k) if source is not None else 0.0
        if eta:
            r = r + eta * ((x - source) / grid.t[k] - r)  # (y0 - x) / sigma in tau units, towards the clean end
        out = x + (grid.t[k + 1] - grid.t[k]) * r
        return RFInversionState(out, source=source, noise=getattr(state, "noise", None))

    def backward_step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        x, noise = state.x, state.noise
        r = _velocity(field, grid, k + 1, x)
        if self.gamma:
            r = r + self.gamma * ((noise - x) / (grid.schedule.T - grid.t[k + 1]) - r)
        out = x + (grid.t[k] - grid.t[k + 1]) * r
        return RFInversionState(out, source=state.source, noise=noise)
