"""The solver protocol every method follows, and the grid it steps along.

A solver moves a :class:`State` one grid interval at a time: :meth:`Solver.step` from index ``k`` to
``k + 1`` (towards data, generation) and :meth:`Solver.backward_step` from ``k + 1`` back to ``k``
(towards noise, inversion). ``state.x`` is always the latent at the state's grid index; methods that
carry more (a second latent, a cached derivative) add named fields to their own State subclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..fields import Field
from ..schedules import NoiseSchedule, check_grid

__all__ = ["Grid", "Solver", "State"]


class Grid:
    """Timesteps in generation order with their schedule values cached as Python floats.

    ``cache`` is a scratch dict where solvers keep per-grid coefficients (keyed by their own names).
    """

    def __init__(self, schedule: NoiseSchedule, timesteps: Any):
        self.schedule = schedule
        self.timesteps = check_grid(schedule, timesteps)
        ts = self.timesteps
        self.t: list[float] = ts.tolist()
        self.alpha: list[float] = schedule.alpha(ts).tolist()
        self.sigma: list[float] = schedule.sigma(ts).tolist()
        self.lam: list[float] = schedule.lam(ts).tolist()
        self.cache: dict[Any, Any] = {}

    @property
    def steps(self) -> int:
        """Number of intervals."""
        return len(self.t) - 1

    def __len__(self) -> int:
        return len(self.t)

    def __repr__(self) -> str:
        return f"Grid(steps={self.steps}, t={self.t[0]:.6g}->{self.t[-1]:.6g})"


@dataclass
class State:
    """The latent at the current grid index; subclasses add auxiliary tensors by name."""

    x: Tensor

    def tensors(self) -> dict[str, Tensor]:
        """All tensors of the state, by field name (``x`` first)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, Tensor)}


class Solver:
    """Base class of all solvers. Subclasses set these attributes and implement the two steps."""

    name: str = "solver"
    exact: bool = False  # invert -> generate with the same model is exact to round-off
    nfe_per_step: int = 1  # model calls per step
    order: int = 1  # classical order of convergence
    # The grid the method's reference code steps on (``spacing="auto"``): "time" = diffusers-style timesteps
    # for DDIM-family and exactly reversible methods, "lambda" = the lambda-uniform grid for Runge-Kutta methods.
    reference_spacing: str = "lambda"

    def options(self) -> dict[str, Any]:
        """The user-facing options of this solver (for reports and run configurations)."""
        return {}

    @property
    def reversal_order(self) -> int | None:
        """``p`` with ``|Phi_{-h}(Phi_h(y)) - y| = O(h^p)``; ``None`` when exact."""
        return None

    def init_state(self, x: Tensor, grid: Grid) -> State:
        """Generation state at grid index 0 from a plain latent."""
        return State(x)

    def init_inversion(self, x: Tensor, grid: Grid) -> State:
        """Inversion state at the clean end (last grid index) from a plain latent."""
        return State(x)

    def to_generation(self, state: State, grid: Grid) -> State:
        """The generation state that continues from an inversion's final state (default: the same)."""
        return state

    def step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        """Advance ``state`` from grid index ``k`` to ``k + 1`` (towards data)."""
        raise NotImplementedError

    def backward_step(self, field: Field, grid: Grid, k: int, state: State) -> State:
        """Move ``state`` from grid index ``k + 1`` back to ``k`` (towards noise)."""
        raise NotImplementedError

    def describe(self) -> str:
        """``name(option=value, ...)``."""
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{self.name}({opts})"

    @staticmethod
    def _check_fraction(name: str, value: float) -> float:
        """Validate an option in (0, 1]."""
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number in (0, 1], got {value!r}") from None
        if not (0.0 < v <= 1.0):
            raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        return v

    def __repr__(self) -> str:
        return self.describe()
