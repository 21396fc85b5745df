"""Invert a clean latent to noise and generate back: the per-step loop shared by every solver."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .fields import EpsModel, Field
from .schedules import NoiseSchedule, make_grid
from .solvers import Grid, Solver, State, get_solver

__all__ = ["Inversion", "SolverDivergence", "generate", "invert", "resolve_grid"]

# callback(step_index, timestep, state) -> optional replacement state
Callback = Callable[[int, float, State], "State | None"]

DEFAULT_STEPS = 50
DEFAULT_DIVERGENCE_LIMIT = 1e4


class SolverDivergence(RuntimeError):
    """A solver produced a non-finite or exploding latent."""

    def __init__(self, solver: str, step: int, timestep: float, value: float):
        self.solver, self.step, self.timestep, self.value = solver, step, timestep, value
        what = "non-finite values" if not math.isfinite(value) else f"max |x| = {value:.3g}"
        super().__init__(f"solver {solver} diverged at step {step} (timestep {timestep:.4g}): {what}")


@dataclass
class Inversion:
    """The result of :func:`invert`: the noisy latent, any auxiliary solver state, the grid and solver."""

    state: State
    grid: Grid
    solver: Solver
    dtype: torch.dtype
    nfe: int = 0

    @property
    def latent(self) -> Tensor:
        """The inverted (noisy) latent at the grid's first timestep, in the caller's dtype."""
        return self.state.x.to(self.dtype)

    @property
    def timesteps(self) -> Tensor:
        """The grid, generation order (float64)."""
        return self.grid.timesteps

    @property
    def schedule(self) -> NoiseSchedule:
        return self.grid.schedule

    def to(self, device: torch.device | str) -> Inversion:
        """The same inversion with its tensors on ``device``."""
        tensors = {k: v.to(device) for k, v in self.state.tensors().items()}
        return Inversion(
            type(self.state)(**{**vars(self.state), **tensors}), self.grid, self.solver, self.dtype, self.nfe
        )

    def __repr__(self) -> str:
        return f"Inversion(solver={self.solver.describe()}, {self.grid}, latent={tuple(self.state.x.shape)})"


def _work_dtype(x: Tensor) -> torch.dtype:
    """Solver state dtype: the caller's, but never below float32."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _check_latent(x: Any, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or inf")
    return x


def resolve_grid(
    schedule: NoiseSchedule,
    steps: int | None = None,
    spacing: str = "lambda",
    timesteps: Sequence[float] | Tensor | None = None,
    start: float | None = None,
) -> Grid:
    """A :class:`Grid` from ``steps``/``spacing``/``start`` or an explicit ``timesteps`` list."""
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if timesteps is not None:
        if steps is not None or start is not None:
            raise ValueError("give either timesteps= or steps=/start=, not both")
        return Grid(schedule, timesteps)
    return Grid(schedule, make_grid(schedule, DEFAULT_STEPS if steps is None else steps, spacing, start))


class _Loop:
    """Runs a solver's steps over a grid with progress, callback and divergence checks."""

    def __init__(
        self,
        solver: Solver,
        grid: Grid,
        field: Field,
        callback: Callback | None,
        divergence_limit: float | None,
        progress: bool | str,
    ):
        if divergence_limit is not None and not (
            isinstance(divergence_limit, (int, float)) and 0 < divergence_limit < math.inf
        ):  # NaN would flag every step, inf would let inf through
            raise ValueError(f"divergence_limit must be a positive finite number or None, got {divergence_limit!r}")
        self.solver, self.grid, self.field = solver, grid, field
        self.callback, self.limit, self.progress = callback, divergence_limit, progress

    def run(self, state: State, indices: range, backward: bool) -> State:
        desc = self.progress if isinstance(self.progress, str) else ("invert" if backward else "generate")
        move = self.solver.backward_step if backward else self.solver.step
        with tqdm(total=len(indices), desc=desc, leave=False, disable=not self.progress) as bar:
            for n, k in enumerate(indices):
                state = move(self.field, self.grid, k, state)
                at = k if backward else k + 1
                if self.limit is not None:
                    peak = state.x.detach().abs().amax().item()  # one sync per step, not per stage
                    if not peak <= self.limit:
                        raise SolverDivergence(self.solver.name, n + 1, self.grid.t[at], peak)
                if self.callback is not None:
                    new = self.callback(at, self.grid.t[at], state)
                    state = state if new is None else new
                bar.update()
        return state


def invert(
    model: EpsModel,
    x0: Tensor,
    schedule: NoiseSchedule,
    solver: str | Solver = "ees27",
    steps: int | None = None,
    spacing: str = "lambda",
    timesteps: Sequence[float] | Tensor | None = None,
    start: float | None = None,
    callback: Callback | None = None,
    divergence_limit: float | None = DEFAULT_DIVERGENCE_LIMIT,
    progress: bool | str = False,
    **solver_options: Any,
) -> Inversion:
    """Run the probability-flow ODE from the clean latent ``x0`` to the grid's first (noisiest) timestep.

    ``model(x, t)`` returns the (guided) noise prediction. The grid is ``steps`` intervals of
    ``spacing`` from ``start`` (default: the schedule's last timestep) down to 0, or an explicit
    ``timesteps`` list in generation order. Extra keyword arguments are solver options.
    """
    x0 = _check_latent(x0, "x0")
    slv = get_solver(solver, **solver_options)
    grid = resolve_grid(schedule, steps, spacing, timesteps, start)
    field = Field(model, schedule)
    state = slv.init_inversion(x0.to(_work_dtype(x0)), grid)
    loop = _Loop(slv, grid, field, callback, divergence_limit, progress)
    state = loop.run(state, range(grid.steps - 1, -1, -1), backward=True)
    return Inversion(state, grid, slv, x0.dtype, field.nfe)


def generate(
    model: EpsModel,
    x: Tensor | Inversion,
    /,
    schedule: NoiseSchedule | None = None,
    solver: str | Solver | None = None,
    steps: int | None = None,
    spacing: str | None = None,
    timesteps: Sequence[float] | Tensor | None = None,
    start: float | None = None,
    callback: Callback | None = None,
    divergence_limit: float | None = DEFAULT_DIVERGENCE_LIMIT,
    progress: bool | str = False,
    **solver_options: Any,
) -> Tensor:
    """Run the probability-flow ODE from noise to the clean end and return the clean latent.

    From an :class:`Inversion` the grid, solver and auxiliary state are the inversion's (editing:
    pass the target prompt's model). From a plain tensor ``x`` (at the grid's first timestep) give
    ``schedule`` and, optionally, ``solver`` (default ``"ees27"``) and the grid as in :func:`invert`
    (``spacing`` defaults to ``"lambda"``). ``model`` and ``x`` are positional-only, so that the EES
    family parameter ``x=`` can be passed as a solver option.
    """
    if isinstance(x, Inversion):
        given = {"schedule": schedule, "solver": solver, "steps": steps, "spacing": spacing}
        given |= {"timesteps": timesteps, "start": start}
        clash = [k for k, v in given.items() if v is not None] + sorted(solver_options)
        if clash:
            raise ValueError(f"generate from an Inversion uses its own grid and solver; drop {', '.join(clash)}")
        slv, grid, out_dtype = x.solver, x.grid, x.dtype
        state = slv.to_generation(x.state, grid)
        _check_latent(state.x, "inverted latent")
    else:
        x = _check_latent(x, "x")
        if schedule is None:
            raise ValueError("generate from a plain tensor needs a schedule")
        slv = get_solver("ees27" if solver is None else solver, **solver_options)
        grid = resolve_grid(schedule, steps, "lambda" if spacing is None else spacing, timesteps, start)
        out_dtype = x.dtype
        state = slv.init_state(x.to(_work_dtype(x)), grid)
    field = Field(model, grid.schedule)
    state = _Loop(slv, grid, field, callback, divergence_limit, progress).run(state, range(grid.steps), backward=False)
    return state.x.to(out_dtype)
