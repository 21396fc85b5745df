"""The README's solver table states every solver's option defaults: pinned against the registry, both ways.

A changed default in the code, or in the README, fails here; so does a solver or an option one side lacks.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from diffinv.solvers import get_solver, list_solvers, solver_options

README = Path(__file__).resolve().parents[1] / "README.md"

# What the README promises, written out: the table must say exactly this and the registry must build it.
DOCUMENTED = {
    "edict": {"p": 0.93, "leapfrog": True},
    "bdia": {"gamma": 0.96},
    "belm": {},  # O-BELM: no options, its coefficients are fixed by the method
    "mf": {"base": "ees25", "coupling": 0.999},
    "rex": {"base": "euler", "mode": "noise", "coupling": 0.999},
    "ddim": {"inversion_timestep": "current"},
    "reversible_heun": {"form": "lambda-x"},
    "ees27": {"form": "lambda-x", "x": (5 - 3 * math.sqrt(2)) / 14},
    "ees25": {"x": 1 / 10},
}


def _table() -> dict[str, str]:
    """Solver name -> the text of its "options (defaults)" cell, from the README's solver table."""
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("`"):
            for name in re.findall(r"`([a-z0-9_]+)`", cells[0]):
                rows[name] = cells[6]
    return rows


def _number(text: str) -> float:
    """A README number: ``0.93``, ``1/10``, ``(5−3√2)/14``."""
    expr = text.replace("−", "-").replace("√2", "*2**0.5")
    if not re.fullmatch(r"[0-9.()+\-*/ ]+", expr):
        raise ValueError(f"not a number: {text!r}")
    return float(eval(expr))  # only digits and arithmetic, checked above


def _readme_defaults(cell: str) -> dict[str, object]:
    """``name=value`` pairs in backticks, and ``x`` stated as "(..., default <number>)" in words."""
    out: dict[str, object] = {}
    for name, value in re.findall(r"`([a-z_]+)=([^`]+)`", cell):
        value = value.strip('"')
        if value in ("True", "False"):
            out[name] = value == "True"
        elif re.fullmatch(r"[0-9.]+", value):
            out[name] = float(value)
        else:
            out[name] = value
    words = re.search(r"`x` \((?:family parameter, )?default (.+)\)$", cell)
    if words:
        out["x"] = _number(words.group(1))
    return out


def _check_registry(solver: str, defaults: dict[str, object]) -> None:
    signature, built = solver_options(solver), get_solver(solver)
    for name, value in defaults.items():
        assert name in signature, (solver, name, signature)
        if name == "x":  # the EES family parameter; default None = the authors' member, whose weight b1 is x
            member = get_solver(solver, x=value).tableau
            assert built.tableau.b[0] == pytest.approx(value, rel=1e-14)
            assert [*built.tableau.b, *sum(built.tableau.a, ())] == pytest.approx(
                [*member.b, *sum(member.a, ())], abs=1e-14
            )
        else:
            assert signature[name] == value, (solver, name, signature[name])
            assert built.options()[name] == value, (solver, name, built.options())


def test_the_table_lists_every_solver():
    assert set(_table()) == set(list_solvers())


@pytest.mark.parametrize("solver", sorted(DOCUMENTED))
def test_documented_defaults_are_the_registrys(solver):
    documented = DOCUMENTED[solver]
    cell = _table()[solver]
    readme = _readme_defaults(cell)
    assert set(readme) == set(documented), (solver, cell)
    for name, value in documented.items():
        same = math.isclose(readme[name], value, rel_tol=1e-12) if isinstance(value, float) else readme[name] == value
        assert same, (solver, name, readme[name], value)
    if not documented:
        assert cell == "—" and solver_options(solver) == {}
    _check_registry(solver, documented)


def test_every_default_the_readme_states_is_the_registrys():
    for solver, cell in _table().items():
        _check_registry(solver, _readme_defaults(cell))
