"""What the rectified-flow families (SD3, FLUX) share: velocity prediction and the pipeline scheduler's grids.

Their denoiser predicts the velocity ``v = eps - x0`` on ``x = (1 - sigma) x0 + sigma eps`` (prediction type
``"flow"``, :mod:`diffinv.fields`), and their ``FlowMatchEulerDiscreteScheduler`` only chooses the grid (a static
shift for SD3, a resolution-dependent one for FLUX). The grids of :meth:`FlowFamily.timesteps`:

* ``"time"``: the pipeline's own sampler grid (what the pipeline's ``__call__`` steps on, shift included), from
  ``sigma = 1`` to ``sigma = 0``, as ``make_grid(..., "scheduler")`` gives it;
* ``"lambda"``/``"sigma"``: half-log-SNR (or ``sigma/alpha``) is infinite at both ends of a flow path, so these keep
  the pipeline grid's first and last interval (``sigma = 1`` to its first sigma below 1, its last sigma above 0 to
  ``sigma = 0``) and space the points in between uniformly in that variable.

``strength < 1`` keeps the last ``int(steps * strength)`` steps (at least one) of the grid, as diffusers' img2img
pipelines do.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from ..schedules import make_grid
from .base import ModelFamily

__all__ = ["FlowFamily"]


class FlowFamily(ModelFamily):
    """A flow-matching family: velocity prediction, grids from the pipeline's ``FlowMatchEulerDiscreteScheduler``."""

    def __init__(self, pipe: Any):
        if type(pipe.scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(
                f"{self.name} models need their FlowMatchEulerDiscreteScheduler, got {type(pipe.scheduler).__name__}"
            )
        super().__init__(pipe)

    @property
    def prediction_type(self) -> str:
        return "flow"

    def scheduler_options(self, steps: int, size: tuple[int, int]) -> dict[str, Any]:
        """Extra ``set_timesteps`` keywords of the pipeline's ``__call__`` for ``steps`` steps at image ``size``."""
        return {}

    def pipeline_grid(self, steps: int, size: tuple[int, int]) -> Tensor:
        """The pipeline's own ``steps``-step grid at image ``size`` (timesteps ``sigma * N``, ending at 0)."""
        scheduler = copy.deepcopy(self.pipe.scheduler)  # set_timesteps changes the scheduler's state
        return make_grid(self.schedule, steps, "scheduler", scheduler=scheduler, **self.scheduler_options(steps, size))

    def timesteps(self, steps: int, spacing: str, strength: float = 1.0, size: tuple[int, int] | None = None) -> Tensor:
        grid = self.pipeline_grid(steps, self.native_size if size is None else size)
        if spacing in ("lambda", "sigma") and steps >= 3:
            inner = make_grid(self.schedule, steps - 2, spacing, start=float(grid[1]), end=float(grid[-2]))
            grid = torch.cat([grid[:1], inner, grid[-1:]])
        elif spacing not in ("time", "lambda", "sigma"):
            raise ValueError(f"unknown spacing {spacing!r}; choose one of time, lambda, sigma")
        keep = max(1, min(steps, int(steps * strength)))
        return grid[len(grid) - 1 - keep :].clone()
