"""Inversions beyond the plain solver round trip: Null-text inversion and DirectInversion.

Both start from a *pivot*: the solver's inversion of the clean latent with the source prompt at guidance 1 (as the
official code: google/prompt-to-prompt ``null_text_w_ptp.ipynb``, cure-lab/PnPInversion ``models/p2p/inversion.py``),
keeping the latent at every grid index. Then, along the generation direction with guidance ``w``:

* **Null-text inversion** (Mokady et al., CVPR 2023): per step ``k`` the unconditional text embedding is optimised
  with Adam (lr ``1e-2 * (1 - k / 100)``, at most ``inner_steps`` = 10 updates, stop once the loss is below
  ``epsilon + k * 2e-5``, ``epsilon`` = 1e-5) so that the guided step from the current latent lands on the pivot;
  the embedding carries over to the next step and the current latent follows the guided step with the optimised
  embedding. Gradients flow through the whole solver step, so any one-step solver works (RK stages included)
  where its own step is accurate at guidance 1 (no embedding corrects a far-off step).
* **DirectInversion** (Ju et al., ICLR 2024): the differences ``pivot_{k+1} - step(pivot_k)``
  (:mod:`diffinv.controls.direct`), for every solver.

Null-text inversion refuses coupled, two-step and multistep solvers (:func:`diffinv.controls.direct.check_one_step`):
the step it optimises would also depend on a second state that the embedding of earlier steps moved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .controls.direct import check_one_step, compute_offsets
from .families import Conditioning
from .fields import EpsModel, Field
from .solve import Inversion, invert
from .solvers import Grid, Solver, State

__all__ = ["INVERSION_METHODS", "check_method", "direct_offsets", "null_text_embeddings", "pivot_inversion"]

INVERSION_METHODS = ("plain", "null-text", "direct")
NTI_INNER_STEPS = 10
NTI_EPSILON = 1e-5
NTI_LR = 1e-2
_METHOD_NAMES = {"null-text": "null-text inversion", "direct": "DirectInversion"}


def check_method(method: str, solver: Solver, smoothing: Sequence[str] = ()) -> None:
    """Refuse an unknown inversion ``method`` or one that does not combine with ``solver``/``smoothing``
    (a ``ValueError`` with a one-line reason), before anything is loaded or computed."""
    if method not in INVERSION_METHODS:
        raise ValueError(f"unknown inversion method {method!r}; choose one of {', '.join(INVERSION_METHODS)}")
    if method == "plain":
        return
    if method == "null-text":
        check_one_step(solver, _METHOD_NAMES[method])
    clash = [s for s in smoothing if s in ("npi", "proximal")]
    if clash:
        raise ValueError(
            f"inversion {method} does not combine with smoothing {', '.join(clash)} (both replace the null branch "
            "or the inversion path)"
        )


def pivot_inversion(
    model: EpsModel, latent: Tensor, schedule: Any, solver: Solver, timesteps: Tensor, progress: bool | str = False
) -> tuple[Inversion, list[Tensor]]:
    """Invert ``latent`` with ``model`` (guidance 1) and keep the latent at every grid index (``[k]`` = index k)."""
    trajectory: dict[int, Tensor] = {len(timesteps) - 1: latent.clone()}

    def keep(k: int, t: float, state: State) -> None:
        trajectory[k] = state.x.clone()

    inv = invert(model, latent, schedule, solver=solver, timesteps=timesteps, callback=keep, progress=progress)
    return inv, [trajectory[k] for k in range(len(timesteps))]


def direct_offsets(model: EpsModel, inv: Inversion, pivot: list[Tensor]) -> Tensor:
    """DirectInversion's per-step differences along ``pivot`` under the guided ``model``: ``(steps, N, ...)``,
    from the generation state that ``inv`` (the pivot inversion) hands to an edit."""
    start = inv.solver.to_generation(inv.state, inv.grid)
    return compute_offsets(inv.solver, Field(model, inv.grid.schedule), inv.grid, pivot, start)


DenoiseFn = Callable[[Tensor, Tensor, Conditioning], Tensor]


def _detached(c: Conditioning) -> Conditioning:
    """A normal (not inference-mode) copy of ``c``, so that autograd may save it."""
    return Conditioning(c.hidden.detach().clone(), {k: v.detach().clone() for k, v in c.extra.items()})


class _NullTextEps:
    """``eps_u + w (eps_c - eps_u)`` with the unconditional branch on the embedding being optimised.

    As the official ``null_optimization``, the conditional branch gets no gradient where the latent carries none
    and is computed once per latent (every inner step of a DDIM step sees the same latent); at later stages of a
    Runge-Kutta step the latent depends on the embedding and both branches are differentiated.
    """

    def __init__(self, denoise: DenoiseFn, cond: Conditioning, guidance: float):
        self.denoise, self.cond, self.guidance = denoise, cond, float(guidance)
        self.uncond: Conditioning | None = None
        self._cached: tuple[Tensor, float, Tensor] | None = None

    def _cond_eps(self, x: Tensor, t: Tensor) -> Tensor:
        if x.requires_grad:
            return self.denoise(x, t, self.cond)
        hit = self._cached
        if hit is None or hit[0] is not x or hit[1] != float(t):
            with torch.no_grad():
                hit = (x, float(t), self.denoise(x, t, self.cond))
            self._cached = hit
        return hit[2]

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        eps_c = self._cond_eps(x, t)
        eps_u = self.denoise(x, t, self.uncond)
        return eps_u + self.guidance * (eps_c - eps_u)


def null_text_embeddings(
    denoise: DenoiseFn,
    cond: Conditioning,
    uncond: Conditioning,
    guidance: float,
    solver: Solver,
    grid: Grid,
    pivot: list[Tensor],
    inner_steps: int = NTI_INNER_STEPS,
    epsilon: float = NTI_EPSILON,
    lr: float = NTI_LR,
    progress: bool = False,
) -> Tensor:
    """Null-text inversion: the optimised unconditional text states per generation step, ``(steps, N, L, D)``.

    ``denoise(x, t, conditioning)`` is the denoiser's eps prediction, ``cond``/``uncond`` the source prompts' and
    the null prompt's conditioning, ``guidance`` the CFG scale the edit will use, ``pivot[k]`` the guidance-1
    inversion at grid index ``k``. Runs with gradients on whatever the caller's mode (``torch.inference_mode()``
    or ``torch.no_grad()`` included); only the embedding gets gradients, not the model's weights.
    Beyond 100 steps the official learning-rate decay reaches 0: those steps keep the carried embedding.
    """
    check_one_step(solver, "null-text inversion")
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
        raise ValueError(f"inner_steps must be an integer >= 0, got {inner_steps!r}")
    from tqdm.auto import tqdm

    out = []
    with torch.inference_mode(False), torch.enable_grad():
        model = _NullTextEps(denoise, _detached(cond), guidance)
        pivot = [p.detach().clone() for p in pivot]
        base = _detached(uncond)
        dtype = base.hidden.dtype
        emb = base.hidden.to(torch.promote_types(dtype, torch.float32))  # Adam on fp16 values would stall
        x = pivot[0]
        for k in tqdm(range(grid.steps), desc="null-text", leave=False, disable=not progress):
            emb = emb.detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([emb], lr=max(lr * (1.0 - k / 100.0), 0.0))
            for _ in range(inner_steps):
                model.uncond = Conditioning(emb.to(dtype), base.extra)
                field = Field(model, grid.schedule)
                loss = F.mse_loss(solver.step(field, grid, k, State(x)).x, pivot[k + 1])
                (emb.grad,) = torch.autograd.grad(loss, [emb])
                opt.step()
                if loss.item() < epsilon + k * 2e-5:
                    break
            emb = emb.detach()
            out.append(emb.to(dtype))
            with torch.no_grad():
                model.uncond = Conditioning(emb.to(dtype), base.extra)
                x = solver.step(Field(model, grid.schedule), grid, k, State(x)).x
    return torch.stack(out)
