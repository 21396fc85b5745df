"""Inversions beyond the plain solver round trip: Null-text inversion and DirectInversion.

Both start from a *pivot*: the solver's inversion of the clean latent with the source prompt at guidance 1 (as the
official code: google/prompt-to-prompt ``null_text_w_ptp.ipynb``, cure-lab/PnPInversion ``models/p2p/inversion.py``),
keeping the latent at every grid index. Then, along the generation direction with guidance ``w``:

* **Null-text inversion** (Mokady et al., CVPR 2023): per step ``k`` the unconditional text embedding is optimised
  with Adam (lr ``1e-2 * (1 - k / 100)``, at most ``inner_steps`` = 10 updates, stop once the loss is below
  ``epsilon + k * 2e-5``, ``epsilon`` = 1e-5) so that the guided step from the current latent lands on the pivot;
  the embedding carries over to the next step and the current latent follows the guided step with the optimised
  embedding. Gradients flow through the whole solver step, so any one-step solver works (RK stages included).
* **DirectInversion** (Ju et al., ICLR 2024): the differences ``pivot_{k+1} - step(pivot_k)``
  (:mod:`diffinv.controls.direct`).

Coupled, two-step and multistep solvers are refused (:func:`diffinv.controls.direct.check_one_step`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .controls.direct import check_one_step, compute_offsets
from .families import Conditioning
from .fields import EpsModel, Field
from .solve import Inversion, invert
from .solvers import Grid, Solver, State

__all__ = ["INVERSION_METHODS", "direct_offsets", "null_text_embeddings", "pivot_inversion"]

INVERSION_METHODS = ("plain", "null-text", "direct")
NTI_INNER_STEPS = 10
NTI_EPSILON = 1e-5
NTI_LR = 1e-2


def pivot_inversion(
    model: EpsModel, latent: Tensor, schedule: Any, solver: Solver, timesteps: Tensor, progress: bool | str = False
) -> tuple[Inversion, list[Tensor]]:
    """Invert ``latent`` with ``model`` (guidance 1) and keep the latent at every grid index (``[k]`` = index k)."""
    trajectory: dict[int, Tensor] = {len(timesteps) - 1: latent.clone()}

    def keep(k: int, t: float, state: State) -> None:
        trajectory[k] = state.x.clone()

    inv = invert(model, latent, schedule, solver=solver, timesteps=timesteps, callback=keep, progress=progress)
    return inv, [trajectory[k] for k in range(len(timesteps))]


def direct_offsets(model: EpsModel, solver: Solver, grid: Grid, pivot: list[Tensor]) -> Tensor:
    """DirectInversion's per-step differences along ``pivot`` under the guided ``model``: ``(steps, N, ...)``."""
    check_one_step(solver, "DirectInversion")
    return compute_offsets(solver, Field(model, grid.schedule), grid, pivot)


def null_text_embeddings(
    guided: Callable[[Conditioning], EpsModel],
    uncond: Conditioning,
    solver: Solver,
    grid: Grid,
    pivot: list[Tensor],
    inner_steps: int = NTI_INNER_STEPS,
    epsilon: float = NTI_EPSILON,
    lr: float = NTI_LR,
    progress: bool = False,
) -> Tensor:
    """Null-text inversion: the optimised unconditional text states per generation step, ``(steps, N, L, D)``.

    ``guided(uncond)`` is the guided eps-model with the unconditional conditioning ``uncond``. Runs with
    gradients on, whatever the caller's mode; only the embedding gets gradients (not the model's weights).
    """
    check_one_step(solver, "null-text inversion")
    from tqdm.auto import tqdm

    out = []
    with torch.inference_mode(False), torch.enable_grad():
        pivot = [p.clone() for p in pivot]
        emb = uncond.hidden.clone().to(torch.float32)
        extra = {k: v.clone() for k, v in uncond.extra.items()}
        dtype = uncond.hidden.dtype
        x = pivot[0]
        for k in tqdm(range(grid.steps), desc="null-text", leave=False, disable=not progress):
            emb = emb.detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([emb], lr=lr * (1.0 - k / 100.0))
            target = pivot[k + 1]
            for _ in range(inner_steps):
                field = Field(guided(Conditioning(emb.to(dtype), extra)), grid.schedule)
                moved = solver.step(field, grid, k, State(x)).x
                loss = F.mse_loss(moved, target)
                (grad,) = torch.autograd.grad(loss, [emb])
                emb.grad = grad
                opt.step()
                if loss.item() < epsilon + k * 2e-5:
                    break
            emb = emb.detach()
            out.append(emb.to(dtype))
            with torch.no_grad():
                field = Field(guided(Conditioning(emb.to(dtype), extra)), grid.schedule)
                x = solver.step(field, grid, k, State(x)).x.detach()
    return torch.stack(out)
