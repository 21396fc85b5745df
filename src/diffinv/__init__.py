"""diffinv: diffusion inversion and text-guided editing with stable, near-reversible ODE solvers."""

from __future__ import annotations

from .fields import FORMS, Field, as_eps_model
from .schedules import NoiseSchedule, make_grid
from .solve import Inversion, SolverDivergence, generate, invert
from .solvers import Solver, get_solver, list_solvers
from .tableaux import Tableau, ees25, ees27

__version__ = "0.1.0"


def __getattr__(name: str):
    # The editor needs diffusers; import it only when asked for, so `import diffinv` needs only torch.
    if name == "Editor":
        from .editor import Editor

        return Editor
    raise AttributeError(f"module 'diffinv' has no attribute {name!r}")


__all__ = [  # noqa: RUF022 - Editor is resolved lazily by __getattr__
    "Editor",
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
