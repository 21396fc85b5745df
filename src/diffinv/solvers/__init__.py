"""The solver registry: every method by its registry name, built with its options."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ..schedules import SPACINGS, NoiseSchedule
from ..tableaux import EES25, EES27, EULER, HEUN, MIDPOINT, RALSTON, RK4, SQRT2, Tableau, ees25, ees27
from .base import Grid, Solver, State
from .coupled import BDIA, BELM, EDICT
from .exponential import DDIM, DPMSolverPP2M
from .flow import FireFlow, RFInversion, RFSolver
from .reversible import McCallumFoster, ReversibleHeun, Rex
from .rk import ExplicitRK

__all__ = [
    "BDIA",
    "BELM",
    "DDIM",
    "EDICT",
    "EES25_SYM_X",
    "EES27_SYM_X",
    "FLOW_ONLY",
    "SOLVERS",
    "SPACING_CHOICES",
    "DPMSolverPP2M",
    "ExplicitRK",
    "FireFlow",
    "Grid",
    "McCallumFoster",
    "RFInversion",
    "RFSolver",
    "ReversibleHeun",
    "Rex",
    "Solver",
    "State",
    "get_solver",
    "list_solvers",
    "resolve_spacing",
]

# What users may ask for: a grid spacing, or "auto" (each solver on its reference grid).
SPACING_CHOICES = ("auto", *SPACINGS)


def _rk(name: str, tableau: Tableau) -> Callable[..., Solver]:
    def make(form: str = "lambda-x") -> Solver:
        return ExplicitRK(tableau, form=form, name=name)

    make.__doc__ = f"{tableau.name} ({tableau.stages} stages, order {tableau.order})."
    return make


def _ees25(form: str = "lambda-x", x: float | None = None) -> Solver:
    """EES(2,5;x), default x = 1/10."""
    if x is None:
        return ExplicitRK(EES25, form=form, name="ees25")
    return ExplicitRK(ees25(float(x)), form=form, name="ees25", x=float(x))


def _ees27(form: str = "lambda-x", x: float | None = None) -> Solver:
    """EES(2,7;x), default x = (5 - 3 sqrt 2)/14."""
    if x is None:
        return ExplicitRK(EES27, form=form, name="ees27")
    return ExplicitRK(ees27(float(x)), form=form, name="ees27", x=float(x))


# The EES members whose stage times are symmetric in the step (c <-> 1 - c): on a learned network, whose eps is not
# smooth in t between trained timesteps, only they keep EES's near-reversible round trip (docs/digits-roundtrip.md).
EES25_SYM_X = 0.25  # nodes {0, 1/2, 1}
EES27_SYM_X = (2 - SQRT2) / 4  # nodes {0, 1 - 1/sqrt2, 1/sqrt2, 1}


def _ees25_sym(form: str = "lambda-x") -> Solver:
    """EES(2,5;1/4): nodes {0, 1/2, 1}, symmetric (= ``ees25`` with ``x=0.25``)."""
    return ExplicitRK(ees25(EES25_SYM_X), form=form, name="ees25_sym")


def _ees27_sym(form: str = "lambda-x") -> Solver:
    """EES(2,7;(2 - sqrt 2)/4): nodes {0, 1 - 1/sqrt2, 1/sqrt2, 1}, symmetric (= ``ees27`` with that ``x``)."""
    return ExplicitRK(ees27(EES27_SYM_X), form=form, name="ees27_sym")


SOLVERS: dict[str, Callable[..., Solver]] = {
    "ddim": DDIM,
    "euler": _rk("euler", EULER),
    "heun": _rk("heun", HEUN),
    "midpoint": _rk("midpoint", MIDPOINT),
    "ralston": _rk("ralston", RALSTON),
    "rk4": _rk("rk4", RK4),
    "ees25": _ees25,
    "ees27": _ees27,
    "ees25_sym": _ees25_sym,
    "ees27_sym": _ees27_sym,
    "dpmpp_2m": DPMSolverPP2M,
    "edict": EDICT,
    "bdia": BDIA,
    "belm": BELM,
    "reversible_heun": ReversibleHeun,
    "mf": McCallumFoster,
    "rex": Rex,
    "rf_solver": RFSolver,
    "fireflow": FireFlow,
    "rf_inversion": RFInversion,
}
# Solvers defined on rectified-flow (flow-matching) schedules only; they refuse any other schedule.
FLOW_ONLY = ("rf_solver", "fireflow", "rf_inversion")


def list_solvers(schedule: NoiseSchedule | None = None) -> list[str]:
    """Registry names of all solvers, or of those that run on ``schedule`` (the flow baselines need a flow path)."""
    if schedule is None or schedule.is_flow:
        return list(SOLVERS)
    return [name for name in SOLVERS if name not in FLOW_ONLY]


def solver_options(name: str) -> dict[str, Any]:
    """The options a solver takes, with their defaults."""
    factory = _factory(name)
    return {
        p.name: p.default
        for p in inspect.signature(factory).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _factory(name: str) -> Callable[..., Solver]:
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}") from None


def get_solver(name: str | Solver, **options: Any) -> Solver:
    """Build the solver registered as ``name`` with ``options`` (e.g. ``form="lambda-x"``)."""
    if isinstance(name, Solver):
        if options:
            raise ValueError(f"options {sorted(options)} given with an already built solver {name.describe()}")
        return name
    known = solver_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        accepted = ", ".join(known) or "none"
        raise ValueError(f"solver {name!r} has no option {', '.join(map(repr, unknown))} (accepted: {accepted})")
    return _factory(name)(**options)


def resolve_spacing(solver: str | Solver, spacing: str = "auto") -> str:
    """The grid spacing actually used: ``spacing`` itself, or for ``"auto"`` the solver's reference grid.

    ``"auto"``: DDIM, DPM-Solver++ and the exactly reversible methods (EDICT, BDIA, O-BELM, reversible Heun,
    McCallum-Foster, Rex) step on ``"time"`` (the diffusers-style grid of their reference code), Runge-Kutta
    methods (EES, RK4, Heun, ...) on ``"lambda"`` (lambda-uniform, the paper's). Never returns ``"auto"``.
    """
    if spacing not in SPACING_CHOICES:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACING_CHOICES)}")
    if spacing != "auto":
        return spacing
    return get_solver(solver).reference_spacing
