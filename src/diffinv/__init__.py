"""diffinv: diffusion inversion and text-guided editing with stable, near-reversible ODE solvers."""

from __future__ import annotations

from .fields import FORMS, Field, as_eps_model
from .schedules import NoiseSchedule, make_grid
from .solve import Inversion, SolverDivergence, generate, invert
from .solvers import Solver, get_solver, list_solvers
from .tableaux import Tableau, ees25, ees27

__version__ = "0.1.0"

__all__ = [
    "FORMS",
    "Field",
    "Inversion",
    "NoiseSchedule",
    "Solver",
    "SolverDivergence",
    "Tableau",
    "as_eps_model",
    "ees25",
    "ees27",
    "generate",
    "get_solver",
    "invert",
    "list_solvers",
    "make_grid",
]
