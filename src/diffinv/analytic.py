"""Closed-form test models: diffusion denoisers whose exact eps (and, for Gaussians, exact flow) are known.

For data ``x0 ~ sum_k pi_k N(mu_k, diag s_k^2)`` and ``x_t = alpha_t x0 + sigma_t eps`` the marginal is
``sum_k pi_k N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2))`` and the exact noise prediction is
``eps(x, t) = (x - alpha E[x0 | x]) / sigma`` with
``E[x0 | x] = sum_k w_k(x) [mu_k + alpha s_k^2 (x - alpha mu_k) / (alpha^2 s_k^2 + sigma^2)]``.
A single Gaussian keeps ``(x - alpha mu) / sqrt(v_t)`` constant along the probability-flow ODE, so
its flow is exact in every time variable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .schedules import NoiseSchedule

__all__ = ["DEFAULT_PROMPTS", "GaussianMixture", "GaussianModel", "ScenePrompt", "ToyScenes"]


def _coeffs(schedule: NoiseSchedule, t: Any, batch: int) -> tuple[Tensor, Tensor]:
    """``alpha`` and ``sigma`` as float64 column vectors of length ``batch`` (``t`` scalar or per-sample)."""
    tt = torch.as_tensor(t, dtype=torch.float64).detach().cpu().flatten()
    if tt.numel() == 1:
        tt = tt.expand(batch)
    elif tt.numel() != batch:
        raise ValueError(f"t has {tt.numel()} entries for a batch of {batch}")
    return schedule.alpha(tt)[:, None], schedule.sigma(tt)[:, None]


class GaussianMixture:
    """A diagonal Gaussian mixture over flattened data of shape ``shape``, with its exact denoiser.

    ``means``: ``(K, *shape)``; ``variances``: ``(K, *shape)``, ``(K,)`` or a float; ``weights``: ``(K,)``.
    Computation is in float64; outputs come back in the input's dtype and device.
    """

    def __init__(
        self, schedule: NoiseSchedule, means: Tensor, variances: Tensor | float, weights: Tensor | None = None
    ):
        self.schedule = schedule
        means = torch.as_tensor(means, dtype=torch.float64)
        self.shape = tuple(means.shape[1:])
        k = means.shape[0]
        self.mu = means.reshape(k, -1)
        var = torch.as_tensor(variances, dtype=torch.float64)
        if var.dim() == 0:
            var = var.expand(k)
        self.var = (var.reshape(k, 1) if var.dim() == 1 else var.reshape(k, -1)).expand_as(self.mu).clone()
        if (self.var <= 0).any():
            raise ValueError("mixture variances must be positive")
        # One variance per component (isotropic): posteriors reduce to matrix products, no (B, K, D) tensors.
        self._iso = self.var[:, 0].clone() if bool((self.var == self.var[:, :1]).all()) else None
        self._mu_sq = (self.mu**2).sum(-1)
        w = (
            torch.full((k,), 1.0 / k, dtype=torch.float64)
            if weights is None
            else torch.as_tensor(weights, dtype=torch.float64)
        )
        if w.shape != (k,) or (w <= 0).any():
            raise ValueError(f"weights must be {k} positive numbers")
        self.log_w = torch.log(w / w.sum())

    @property
    def components(self) -> int:
        return self.mu.shape[0]

    def _posterior(self, x: Tensor, t: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Flattened float64 ``x``, per-sample ``alpha, sigma`` (``(B, 1)``) and the ``(B, K)`` log-densities."""
        b = x.shape[0]
        xf = x.detach().to("cpu", torch.float64).reshape(b, -1)
        a, s = _coeffs(self.schedule, t, b)
        if self._iso is not None:
            v = a**2 * self._iso[None] + s**2  # (B, K)
            r2 = (xf**2).sum(-1, keepdim=True) - 2 * a * (xf @ self.mu.T) + a**2 * self._mu_sq[None]
            logp = self.log_w[None] - 0.5 * (xf.shape[1] * torch.log(2 * math.pi * v) + r2 / v)
            return xf, a, s, logp
        v = a[:, :, None] ** 2 * self.var[None] + s[:, :, None] ** 2  # (B, K, D)
        r = xf[:, None, :] - a[:, :, None] * self.mu[None]
        logp = self.log_w[None] - 0.5 * (torch.log(2 * math.pi * v) + r**2 / v).sum(-1)  # (B, K)
        return xf, a, s, logp

    def _mean_given(self, xf: Tensor, a: Tensor, s: Tensor, weights: Tensor) -> Tensor:
        """``sum_k weights_k E[x0 | x_t = x, component k]``, ``(B, D)``, for any ``(B, K)`` weights.

        ``E[x0 | x, k] = mu_k + alpha var_k (x - alpha mu_k) / (alpha^2 var_k + sigma^2)``.
        """
        if self._iso is not None:
            gain = a * self._iso[None] / (a**2 * self._iso[None] + s**2)  # (B, K)
            return (weights * (1 - a * gain)) @ self.mu + (weights * gain).sum(-1, keepdim=True) * xf
        v = a[:, :, None] ** 2 * self.var[None] + s[:, :, None] ** 2
        cond = self.mu[None] + a[:, :, None] * self.var[None] * (xf[:, None, :] - a[:, :, None] * self.mu[None]) / v
        return (weights[:, :, None] * cond).sum(1)

    def x0(self, x: Tensor, t: Any) -> Tensor:
        """Posterior mean ``E[x0 | x_t = x]``."""
        xf, a, s, logp = self._posterior(x, t)
        return self._mean_given(xf, a, s, torch.softmax(logp, dim=-1)).reshape(x.shape).to(x.device, x.dtype)

    def eps(self, x: Tensor, t: Any) -> Tensor:
        """The exact noise prediction ``(x - alpha E[x0|x]) / sigma``."""
        b = x.shape[0]
        a, s = _coeffs(self.schedule, t, b)
        shape = (b,) + (1,) * (x.dim() - 1)
        xf = x.to(torch.float64).cpu()
        out = (xf - a.reshape(shape) * self.x0(xf, t)) / s.reshape(shape)
        return out.to(x.device, x.dtype)

    __call__ = eps

    def velocity(self, x: Tensor, t: Any) -> Tensor:
        """The exact flow-matching velocity ``E[eps - x0 | x_t = x]`` (for a flow-matching schedule).

        ``E[eps | x, k] = sigma (x - alpha mu_k) / (alpha^2 var_k + sigma^2)`` needs no division by ``sigma``,
        so the velocity is exact at both ends of the path, ``sigma = 1`` and ``sigma = 0``.
        """
        xf, a, s, logp = self._posterior(x, t)
        out = self._velocity_given(xf, a, s, torch.softmax(logp, dim=-1))
        return out.reshape(x.shape).to(x.device, x.dtype)

    def _velocity_given(self, xf: Tensor, a: Tensor, s: Tensor, weights: Tensor) -> Tensor:
        """``sum_k weights_k E[eps - x0 | x_t = x, component k]``, ``(B, D)``, for any ``(B, K)`` weights."""
        if self._iso is not None:
            gain = s / (a**2 * self._iso[None] + s**2)  # (B, K)
            noise = (weights * gain).sum(-1, keepdim=True) * xf - a * ((weights * gain) @ self.mu)
        else:
            v = a[:, :, None] ** 2 * self.var[None] + s[:, :, None] ** 2
            noise = (weights[:, :, None] * s[:, :, None] * (xf[:, None, :] - a[:, :, None] * self.mu[None]) / v).sum(1)
        return noise - self._mean_given(xf, a, s, weights)

    def log_prob(self, x: Tensor, t: Any = 0.0) -> Tensor:
        """Exact log-density of ``x`` under the marginal at timestep ``t`` (per sample)."""
        return torch.logsumexp(self._posterior(x, t)[3], dim=-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples of the data distribution (float64)."""
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.mu.shape[1], dtype=torch.float64, generator=generator)
        return (self.mu[k] + self.var[k].sqrt() * z).reshape(n, *self.shape)


class GaussianModel(GaussianMixture):
    """One diagonal Gaussian ``N(mu, diag s^2)``: exact eps and the exact probability-flow map."""

    def __init__(self, schedule: NoiseSchedule, mean: Tensor, variance: Tensor | float):
        mean = torch.as_tensor(mean, dtype=torch.float64)
        var = torch.as_tensor(variance, dtype=torch.float64)
        var = var.expand_as(mean) if var.dim() == 0 else var
        super().__init__(schedule, mean[None], var[None])

    def flow(self, x: Tensor, t_from: float, t_to: float) -> Tensor:
        """The exact probability-flow ODE map of ``x`` from timestep ``t_from`` to ``t_to``."""
        b = x.shape[0]
        a0, s0 = (float(c) for c in (self.schedule.alpha(t_from), self.schedule.sigma(t_from)))
        a1, s1 = (float(c) for c in (self.schedule.alpha(t_to), self.schedule.sigma(t_to)))
        v0 = a0**2 * self.var[0] + s0**2
        v1 = a1**2 * self.var[0] + s1**2
        xf = x.to("cpu", torch.float64).reshape(b, -1)
        out = a1 * self.mu[0] + torch.sqrt(v1 / v0) * (xf - a0 * self.mu[0])
        return out.reshape(x.shape).to(x.device, x.dtype)


# -- toy scenes: a class-conditional Gaussian-mixture image model ----------------------------------


@dataclass(frozen=True)
class ScenePrompt:
    """One prompt of :class:`ToyScenes`: the mean colour of its object, or of the whole image.

    ``whole_scene=False``: the object (a centred square) has mean ``color``; the rest is the shared
    background. ``whole_scene=True``: the prompt recolours every pixel (``color`` + a faint copy of the
    background) and its edit mask is the whole image.
    """

    name: str
    color: tuple[float, float, float]
    whole_scene: bool = False


def _red(d: float) -> ScenePrompt:
    gray = 0.1
    return ScenePrompt(f"red box {d:g}", (gray + d, gray - d / 4, gray - d / 4))


# A gray box (the usual source) and red boxes at log-spaced colour distances ``d`` (edit sizes), plus one
# whole-scene prompt. Pixel values live in about [-1, 1]. The red direction (1, -1/4, -1/4) is not
# orthogonal to brightness, so a red edit also makes the object brighter: through the shared brightness
# offset the exact edit then shifts the background a little too (the coupling an edit can disturb).
DEFAULT_PROMPTS: tuple[ScenePrompt, ...] = (
    ScenePrompt("gray box", (0.1, 0.1, 0.1)),
    *(_red(d) for d in (0.1, 0.2, 0.4, 0.8)),
    ScenePrompt("night scene", (-0.55, -0.5, -0.25), whole_scene=True),
)


class ToyScenes:
    """Toy scenes: small RGB images from a class-conditional Gaussian mixture with exact eps.

    Each prompt's data are ``components`` diagonal Gaussians of variance ``variance`` per pixel. All
    prompts share a smooth background (sky over ground); an object square in the centre takes the
    prompt's colour. Component ``k`` adds a brightness offset ``o_k`` (``o`` evenly spaced in
    ``[-offset, offset]``) to the object and ``coupling * o_k`` to the background, so background and
    object are statistically coupled: an edit that gets the object's component wrong also disturbs
    the background. The unconditional model is the mixture over all prompts' components (prompts
    equally likely); classifier-free guidance combines the two exactly as a text-to-image model does.

    Every prompt's model is a :class:`GaussianMixture` (:meth:`model`); :meth:`eps` and :meth:`guided`
    evaluate all prompts from one posterior over the unconditional mixture, so a batch may mix prompts.
    """

    def __init__(
        self,
        schedule: NoiseSchedule | None = None,
        size: int = 16,
        components: int = 4,
        variance: float = 0.02,
        offset: float = 0.3,
        coupling: float = 1.0,
        prompts: Sequence[ScenePrompt] = DEFAULT_PROMPTS,
    ):
        if isinstance(size, bool) or not isinstance(size, int) or size < 4:
            raise ValueError(f"size must be an integer >= 4, got {size!r}")
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(f"components must be a positive integer, got {components!r}")
        if not variance > 0:
            raise ValueError(f"variance must be positive, got {variance!r}")
        names = [p.name for p in prompts]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"prompts need distinct names, got {names}")
        self.schedule = NoiseSchedule.scaled_linear() if schedule is None else schedule
        self.size, self.components, self.variance = size, components, float(variance)
        self.offset, self.coupling = float(offset), float(coupling)
        self.prompts = tuple(prompts)
        self.shape = (3, size, size)
        self.background = self._background(size)
        self.object_mask = self._square(size)
        means = torch.cat([self._prompt_means(p) for p in self.prompts])
        self.unconditional = GaussianMixture(self.schedule, means, self.variance)

    # -- construction -----------------------------------------------------------------------------
    @staticmethod
    def _background(size: int) -> Tensor:
        """Sky (blue, top) over ground (green, bottom), joined by a smooth horizon, with a faint sun."""
        y = torch.linspace(0, 1, size, dtype=torch.float64)[:, None].expand(size, size)
        x = torch.linspace(0, 1, size, dtype=torch.float64)[None, :].expand(size, size)
        ground = torch.sigmoid((y - 0.62) * 14)
        sky = torch.tensor([-0.35, 0.05, 0.7], dtype=torch.float64)[:, None, None]
        grass = torch.tensor([-0.1, 0.45, -0.4], dtype=torch.float64)[:, None, None]
        sun = 0.5 * torch.exp(-((x - 0.82) ** 2 + (y - 0.15) ** 2) / 0.01)
        return (
            sky * (1 - ground)
            + grass * ground
            + sun * torch.tensor([1.0, 0.8, -0.2], dtype=torch.float64)[:, None, None] * (1 - ground)
        )

    @staticmethod
    def _square(size: int) -> Tensor:
        """The object region: a centred square of half the image's side."""
        m = torch.zeros(size, size, dtype=torch.float64)
        lo = size // 4
        m[lo : size - lo, lo : size - lo] = 1.0
        return m

    def _prompt_means(self, prompt: ScenePrompt) -> Tensor:
        """The ``(components, 3, H, W)`` component means of one prompt."""
        color = torch.tensor(prompt.color, dtype=torch.float64)[:, None, None]
        offsets = torch.linspace(-self.offset, self.offset, self.components, dtype=torch.float64)
        if self.components == 1:
            offsets = torch.zeros(1, dtype=torch.float64)
        if prompt.whole_scene:
            base = (color + 0.3 * self.background).expand(self.shape)
            return base[None] + offsets[:, None, None, None]
        m = self.object_mask
        base = color * m + self.background * (1 - m)
        shift = m + self.coupling * (1 - m)  # per-pixel multiplier of the component offset
        return base[None] + offsets[:, None, None, None] * shift[None, None]

    # -- prompts ----------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """The prompt names, in order."""
        return tuple(p.name for p in self.prompts)

    def index(self, prompt: str) -> int:
        """Position of ``prompt`` in :attr:`names` (``ValueError`` for an unknown prompt)."""
        try:
            return self.names.index(prompt)
        except ValueError:
            raise ValueError(f"unknown prompt {prompt!r}; choose one of {', '.join(map(repr, self.names))}") from None

    def _components_of(self, prompt: str) -> slice:
        i = self.index(prompt)
        return slice(i * self.components, (i + 1) * self.components)

    def model(self, prompt: str | None = None) -> GaussianMixture:
        """The prompt's own :class:`GaussianMixture` (``None``: the unconditional mixture)."""
        if prompt is None:
            return self.unconditional
        sl = self._components_of(prompt)
        mu = self.unconditional.mu[sl].reshape(-1, *self.shape)
        return GaussianMixture(self.schedule, mu, self.unconditional.var[sl].reshape(-1, *self.shape))

    # -- the exact noise prediction ---------------------------------------------------------------
    def _weights(self, logp: Tensor, prompts: str | Sequence[str | None] | None) -> Tensor:
        """Posterior component weights ``(B, K)`` given per-sample prompts (``None``: unconditional)."""
        b = logp.shape[0]
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts] * b
        elif len(prompts) != b:
            raise ValueError(f"{len(prompts)} prompts for a batch of {b}")
        keep = torch.ones_like(logp, dtype=torch.bool)
        for i, p in enumerate(prompts):
            if p is not None:
                keep[i] = False
                keep[i, self._components_of(p)] = True
        return torch.softmax(logp.masked_fill(~keep, -math.inf), dim=-1)

    def _eps_from_weights(self, x: Tensor, t: Any, weights: Callable[[Tensor], Tensor]) -> Tensor:
        """eps with ``E[x0|x]`` taken under the component weights ``weights(logp)`` (linear in them)."""
        mix = self.unconditional
        xf, a, s, logp = mix._posterior(x, t)
        x0 = mix._mean_given(xf, a, s, weights(logp))
        return ((xf - a * x0) / s).reshape(x.shape).to(x.device, x.dtype)

    def eps(self, x: Tensor, t: Any, prompt: str | Sequence[str | None] | None = None) -> Tensor:
        """Exact eps under ``prompt`` (a name, one name per sample, or ``None`` for unconditional)."""
        return self._eps_from_weights(x, t, lambda logp: self._weights(logp, prompt))

    def guided(
        self,
        prompt: str | Sequence[str],
        w: float,
        negative: str | Sequence[str] | None = None,
        prediction: str = "epsilon",
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """Classifier-free guidance ``eps_neg + w (eps_prompt - eps_neg)`` as an ``eps(x, t)`` callable.

        ``negative=None`` uses the unconditional model (the usual CFG); a prompt there plays the
        unconditional branch, as negative-prompt inversion does with the source prompt. ``prompt``
        and ``negative`` may give one name per sample. Guidance is linear in ``E[x0|x]``, so it is one
        posterior evaluation with combined weights. ``prediction="flow"`` returns the guided velocity
        ``v = eps - x0`` instead (on a flow-matching schedule; exact at both ends of the path).
        """
        w = float(w)
        if prediction not in ("epsilon", "flow"):
            raise ValueError(f"prediction must be 'epsilon' or 'flow', got {prediction!r}")
        for p in [prompt] if isinstance(prompt, str) else list(prompt):
            self.index(p)
        if negative is not None:
            for p in [negative] if isinstance(negative, str) else list(negative):
                self.index(p)

        def weights(logp: Tensor) -> Tensor:
            neg = self._weights(logp, negative)
            return neg + w * (self._weights(logp, prompt) - neg)

        def eps(x: Tensor, t: Tensor) -> Tensor:
            return self._eps_from_weights(x, t, weights)

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            mix = self.unconditional
            xf, a, s, logp = mix._posterior(x, t)
            return mix._velocity_given(xf, a, s, weights(logp)).reshape(x.shape).to(x.device, x.dtype)

        return velocity if prediction == "flow" else eps

    # -- masks, scores, samples -------------------------------------------------------------------
    def mask(self, prompt: str) -> Tensor:
        """The ``(H, W)`` 0/1 region whose distribution the prompt sets (the whole image for a scene prompt)."""
        if self.prompts[self.index(prompt)].whole_scene:
            return torch.ones(self.size, self.size, dtype=torch.float64)
        return self.object_mask.clone()

    def edit_mask(self, source: str, target: str) -> Tensor:
        """The ``(H, W)`` region an edit from ``source`` to ``target`` may change: the union of both masks."""
        return torch.maximum(self.mask(source), self.mask(target))

    def log_likelihood(self, x: Tensor, prompt: str | None = None, t: float = 0.0) -> Tensor:
        """Exact ``log p_t(x | prompt)`` per sample (``t = 0``: the clean end); ``None``: unconditional."""
        return self.model(prompt).log_prob(x, t)

    def log_likelihoods(self, x: Tensor, t: float = 0.0) -> Tensor:
        """``(B, P)`` log-likelihoods of every sample under every prompt, in :attr:`names` order."""
        logp = self.unconditional._posterior(x, t)[3]  # component weights 1 / (P K)
        per_prompt = logp.reshape(logp.shape[0], len(self.prompts), self.components)
        return torch.logsumexp(per_prompt, dim=-1) + math.log(len(self.prompts))

    def sample(self, prompt: str | None, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples ``(n, 3, H, W)`` (float64) of the prompt's data distribution."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        return self.model(prompt).sample(n, generator=generator)

    def __repr__(self) -> str:
        return (
            f"ToyScenes(size={self.size}, prompts={len(self.prompts)}, components={self.components}, "
            f"variance={self.variance:g}, offset={self.offset:g}, coupling={self.coupling:g})"
        )
