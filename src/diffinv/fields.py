"""The one place that knows prediction types and the forms of the probability-flow ODE.

A model enters as a callable ``eps(x, t) -> Tensor`` (classifier-free guidance already folded in),
``t`` a tensor of float model timesteps. :func:`as_eps_model` adapts v-, x0- and flow-velocity models.
A flow model's wrapper also gives ``x0`` from the same call (``eps_x0``), so that no solver divides by
``alpha = 0`` at the noise end of a flow-matching path.
A :class:`Field` binds such a model to a :class:`~diffinv.schedules.NoiseSchedule`.

An :class:`ODEForm` says which variable ``s`` the solver steps in, which state ``Y = x / w(t)`` it
carries and what ``dY/ds`` is (reference/solvers.md §2; the variable changes are DERIVED there, since
the paper's eqs. 25-28 could not be read):

==============  ================  ==============  ===================================
name            time ``s``        state ``Y``     ``dY/ds``
==============  ================  ==============  ===================================
``t``           timestep ``tau``  ``x``           ``g x - (g / sigma) eps``, ``g = d log alpha / d tau`` (VP);
                                                  ``alpha' x0 + sigma' eps`` on a flow path (``v / N``)
``lambda-eps``  ``lambda``        ``x / alpha``   ``-(sigma / alpha) eps``
``lambda-x``    ``lambda``        ``x / sigma``   ``(alpha / sigma) x0``  (the paper's default)
``sigma``       ``sigma / alpha`` ``x / alpha``   ``eps``
``gamma``       ``alpha / sigma`` ``x / sigma``   ``x0``  (Rex's "data" mode)
==============  ================  ==============  ===================================

All are the same ODE; an RK method gives different numbers in each. Euler in ``sigma`` is DDIM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .schedules import NoiseSchedule

__all__ = ["FORMS", "PREDICTION_TYPES", "EpsModel", "Field", "FlowEpsModel", "ODEForm", "as_eps_model", "get_form"]

EpsModel = Callable[[Tensor, Tensor], Tensor]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
# diffusers' name for a velocity ``v = eps - x0`` (UniPC/DPM-Solver ``prediction_type="flow_prediction"``).
FLOW_ALIASES = ("flow", "flow_prediction")


class FlowEpsModel:
    """A velocity model ``v = eps - x0`` on ``x = (1 - sigma) x0 + sigma eps`` seen as an eps-model.

    ``eps = x + (1 - sigma) v`` and ``x0 = x - sigma v``: both finite at both ends of the path. Any eps-model
    with ``gives_x0 = True`` and such an ``eps_x0(x, t)`` method is used the same way by :class:`Field`.
    """

    gives_x0 = True

    def __init__(self, model: Callable[[Tensor, Tensor], Tensor], schedule: NoiseSchedule):
        if not schedule.is_flow:
            raise ValueError(f"a flow (velocity) model needs a flow-matching schedule, got {schedule!r}")
        self.model = model
        self.schedule = schedule

    def _sigma(self, x: Tensor, t: Tensor) -> Tensor:
        return self.schedule.sigma(t.detach().cpu()).to(x.device, x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))

    def eps_x0(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(eps, x0)`` from one model call."""
        v = self.model(x, t)
        sigma = self._sigma(x, t)
        return x + (1 - sigma) * v, x - sigma * v

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.eps_x0(x, t)[0]


def as_eps_model(
    model: Callable[[Tensor, Tensor], Tensor], schedule: NoiseSchedule, prediction_type: str = "epsilon"
) -> EpsModel:
    """Wrap a model predicting ``prediction_type`` (diffusers' names) so that it returns eps."""
    if prediction_type == "epsilon":
        return model
    if prediction_type in FLOW_ALIASES:
        return FlowEpsModel(model, schedule)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")

    def eps(x: Tensor, t: Tensor) -> Tensor:
        out = model(x, t)
        shape = (-1,) + (1,) * (x.dim() - 1)
        alpha = schedule.alpha(t.detach().cpu()).to(x.device, x.dtype).reshape(shape)
        sigma = schedule.sigma(t.detach().cpu()).to(x.device, x.dtype).reshape(shape)
        if prediction_type == "v_prediction":  # v = alpha eps - sigma x0  =>  eps = sigma x + alpha v
            return sigma * x + alpha * out
        return (x - alpha * out) / sigma  # "sample": the model predicts x0

    return eps


class Field:
    """An eps-model on a schedule: eps and x0 at scalar float timesteps, counting model calls."""

    def __init__(self, model: EpsModel, schedule: NoiseSchedule):
        if not callable(model):
            raise ValueError(f"model must be callable as eps(x, t), got {type(model).__name__}")
        self.model = model
        self.schedule = schedule
        self.nfe = 0

    def eps(self, x: Tensor, t: float) -> Tensor:
        """Model output (eps) at latent ``x`` and scalar timestep ``t``."""
        tdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.nfe += 1
        out = self.model(x, torch.full((), t, dtype=tdtype, device=x.device))
        if out.shape != x.shape:
            raise ValueError(f"model returned shape {tuple(out.shape)} for input of shape {tuple(x.shape)}")
        return out.to(x.dtype)

    def x0(self, x: Tensor, t: float, coefficients: tuple[float, float] | None = None) -> Tensor:
        """Data prediction ``(x - sigma eps) / alpha``; ``coefficients``: ``(alpha_t, sigma_t)`` if known."""
        return self.eps_x0(x, t, coefficients)[1]

    def eps_x0(self, x: Tensor, t: float, coefficients: tuple[float, float] | None = None) -> tuple[Tensor, Tensor]:
        """``(eps, x0)`` from one model call; a flow model gives ``x0`` itself (finite where ``alpha = 0``)."""
        if getattr(self.model, "gives_x0", False):
            tdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            self.nfe += 1
            eps, x0 = self.model.eps_x0(x, torch.full((), t, dtype=tdtype, device=x.device))
            if eps.shape != x.shape:
                raise ValueError(f"model returned shape {tuple(eps.shape)} for input of shape {tuple(x.shape)}")
            return eps.to(x.dtype), x0.to(x.dtype)
        a, s = self.coefficients(t) if coefficients is None else coefficients
        if a == 0.0:
            raise ValueError(
                f"x0 is undetermined by eps at alpha = 0 (t={t:g}): wrap the model with its prediction type"
            )
        eps = self.eps(x, t)
        return eps, (x - s * eps) / a

    def coefficients(self, t: float) -> tuple[float, float]:
        """``(alpha_t, sigma_t)`` as Python floats (solvers take them from their per-grid caches instead)."""
        return float(self.schedule.alpha(t)), float(self.schedule.sigma(t))


@dataclass(frozen=True)
class ODEForm:
    """One parameterisation of the probability-flow ODE: time variable, state variable, right-hand side."""

    name: str
    description: str

    def s_of_t(self, schedule: NoiseSchedule, t: float | Tensor) -> float | Tensor:
        """Solver time of model timestep ``t`` (elementwise for a float64 tensor of timesteps)."""
        if self.name == "t":
            s = torch.as_tensor(t, dtype=torch.float64)
        elif self.name == "sigma":
            s = schedule.chi(t)
        elif self.name == "gamma":
            s = torch.exp(schedule.lam(t))
        else:
            s = schedule.lam(t)
        return s if isinstance(t, Tensor) else float(s)

    def t_of_s(self, schedule: NoiseSchedule, s: float | Tensor) -> float | Tensor:
        """Model timestep of solver time ``s`` (elementwise for a float64 tensor)."""
        if self.name == "t":
            t = torch.as_tensor(s, dtype=torch.float64)
        elif self.name == "sigma":
            t = schedule.timestep_of_chi(s)
        elif self.name == "gamma":
            t = schedule.timestep_of_lam(torch.log(torch.as_tensor(s, dtype=torch.float64)))
        else:
            t = schedule.timestep_of_lam(s)
        return t if isinstance(s, Tensor) else float(t)

    def weight(self, schedule: NoiseSchedule, t: float | Tensor) -> float | Tensor:
        """``w(t)`` in ``Y = x / w(t)`` (elementwise for a float64 tensor of timesteps)."""
        if self.name == "t":
            w = torch.ones_like(torch.as_tensor(t, dtype=torch.float64))
        elif self.name in ("lambda-x", "gamma"):
            w = schedule.sigma(t)
        else:
            w = schedule.alpha(t)
        return w if isinstance(t, Tensor) else float(w)

    def rhs(self, field: Field, t: float, y: Tensor, coefficients: tuple[float, float] | None = None) -> Tensor:
        """``dY/ds`` at state ``y`` and model timestep ``t`` (one model call).

        ``coefficients``: ``(alpha_t, sigma_t)`` when the caller has them (solvers keep them per grid).
        """
        alpha, sigma = field.coefficients(t) if coefficients is None else coefficients
        if self.name == "t":
            if field.schedule.is_flow:  # dx/dt = alpha' x0 + sigma' eps: finite at both ends (VP: the form below)
                eps, x0 = field.eps_x0(y, t, (alpha, sigma))
                sched = field.schedule
                return float(sched.d_alpha(t)) * x0 + float(sched.d_sigma(t)) * eps
            g = float(field.schedule.d_log_alpha(t))
            eps = field.eps(y, t)
            return g * y - (g / sigma) * eps
        if self.name == "lambda-x":
            return y - field.eps(sigma * y, t)  # (alpha / sigma) x0 with x = sigma y
        if self.name == "gamma":
            return (sigma / alpha) * (y - field.eps(sigma * y, t))  # x0 with x = sigma y
        eps = field.eps(alpha * y, t)
        return eps if self.name == "sigma" else -(sigma / alpha) * eps


FORMS: dict[str, ODEForm] = {
    f.name: f
    for f in (
        ODEForm("t", "original time: dx/dt in model timesteps"),
        ODEForm("lambda-eps", "half-log-SNR time, eps form: d(x/alpha)/dlam = -(sigma/alpha) eps"),
        ODEForm("lambda-x", "half-log-SNR time, data form: d(x/sigma)/dlam = (alpha/sigma) x0"),
        ODEForm("sigma", "sigma/alpha time, state x/alpha: d(x/alpha)/dchi = eps"),
        ODEForm("gamma", "alpha/sigma time, state x/sigma: d(x/sigma)/dgamma = x0"),
    )
}


def get_form(name: str) -> ODEForm:
    """The ODE form called ``name``."""
    try:
        return FORMS[name]
    except KeyError:
        raise ValueError(f"unknown ODE form {name!r}; choose one of {', '.join(FORMS)}") from None
