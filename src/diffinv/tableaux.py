"""Butcher tableaus of explicit Runge-Kutta methods, as validated data.

EES(2,5;x) and EES(2,7;x) are the one-parameter families of Explicit and Effectively Symmetric
schemes of Shmelev, Ebrahimi-Fard, Tapia and Salvi (arXiv 2507.21006; authors' code
``daniil-shmelev/kauri`` ``kauri/rk_methods.py``). The presets use the authors' parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "EES25",
    "EES27",
    "EULER",
    "HEUN",
    "MIDPOINT",
    "RALSTON",
    "RK4",
    "TABLEAUX",
    "Tableau",
    "ees25",
    "ees27",
    "get_tableau",
]

SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class Tableau:
    """An explicit RK method: strictly lower-triangular ``a``, weights ``b``, nodes ``c = rowsum(a)``.

    ``order`` is the classical order; ``antisymmetric_order`` the ``q`` with
    ``Phi_{-h}(Phi_h(y)) = y + O(h^{q+1})`` (the reversal defect).
    """

    name: str
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int
    antisymmetric_order: int

    def __post_init__(self) -> None:
        s = len(self.b)
        if s < 1:
            raise ValueError(f"{self.name}: a tableau needs at least one stage")
        if len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"{self.name}: a must be strictly lower triangular with {s} rows of lengths 0..{s - 1}")
        values = [v for row in self.a for v in row] + list(self.b)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{self.name}: coefficients must be finite")
        if abs(sum(self.b) - 1.0) > 1e-12:
            raise ValueError(f"{self.name}: weights must sum to 1 (consistency), got {sum(self.b)!r}")

    @property
    def stages(self) -> int:
        """Number of stages (model calls per step)."""
        return len(self.b)

    @property
    def c(self) -> tuple[float, ...]:
        """Nodes ``c_i = sum_j a_ij``."""
        return tuple(math.fsum(row) for row in self.a)


def _check_defined(name: str, x: float, factors: tuple[float, ...]) -> None:
    """Raise if ``x`` sits on (or within round-off of) a pole of the family's coefficients."""
    if not math.isfinite(x) or any(abs(f) < 1e-9 for f in factors):
        raise ValueError(f"{name} is undefined at x = {x!r} (a coefficient has a pole there)")


def _p_plus_q_s2(p: int, q: int, s2: float) -> float:
    """``p + q * s2`` for integers p, q and ``s2 = +-sqrt2``, without cancellation when the terms nearly cancel."""
    if (p >= 0) == (q * s2 >= 0):
        return p + q * s2
    return (p * p - 2 * q * q) / (p - q * s2)  # p^2 - 2 q^2 is exact


def ees25(x: float = 0.1) -> Tableau:
    """EES(2,5;x): 3 stages, order 2, reversal defect O(h^6). Undefined at ``x = 1, +-1/2``."""
    x = float(x)
    _check_defined("EES(2,5;x)", x, (x - 1, 1 - 2 * x, 1 + 2 * x))
    a21 = (1 + 2 * x) / (4 * (1 - x))
    a31 = (4 * x - 1) ** 2 / (4 * (x - 1) * (1 - 4 * x**2))
    a32 = (1 - x) / (1 - 4 * x**2)
    return Tableau(f"EES(2,5;{x:g})", ((), (a21,), (a31, a32)), (x, 0.5, 0.5 - x), 2, 5)


def ees27(x: float = (5 - 3 * SQRT2) / 14, plus: bool = True) -> Tableau:
    """EES(2,7;x): 4 stages, order 2, reversal defect O(h^8) (kauri's ``EES27(x, plus)``).

    kauri's formulas (reference/solvers.md §3.4) with their removable singularities cancelled
    (``alpha``, ``beta``, ``a41`` and ``a43`` share factors between numerator and denominator), so the
    family is defined everywhere except at its true poles: ``x = 1, 1/2, (1 - s2)/2, 1 - s2/2, -s2/2``
    with ``s2 = +sqrt2`` (``plus``) or ``-sqrt2``.
    """
    x = float(x)
    s2 = SQRT2 if plus else -SQRT2
    _check_defined("EES(2,7;x)", x, (x - 1, 2 * x - 1, 2 * x - 1 + s2, 2 * x - 2 + s2, 2 * x + s2))
    # kauri: alpha = (-2x + s2 + 1)(2x + s2) / ((2x - 1)(4x^2 - 4x - 1)), 4x^2 - 4x - 1 = (2x - 1 - s2)(2x - 1 + s2)
    alpha = -(2 * x + s2) / ((2 * x - 1) * (2 * x - 1 + s2))
    # kauri: beta = (1 + s2 - 2x)(2 + s2 - 2x) / ((2x - 1)(2x^2 - 4x + 1)(4x^2 - 4x - 1)),
    # 2x^2 - 4x + 1 = (2x - 2 - s2)(2x - 2 + s2) / 2
    beta = 2 / ((2 * x - 1) * (2 * x - 2 + s2) * (2 * x - 1 + s2))
    a21 = (-2 + s2 * (1 - 2 * x)) / (4 * (x - 1))
    a31 = (2 * x + s2 - 2) * (4 * x + s2 - 2) * alpha / (4 * s2 * (x - 1))
    a32 = 0.5 * (s2 - 1) * alpha
    c3, c2, c1, c0 = (_p_plus_q_s2(p, q, s2) for p, q in ((80, -40), (-88, 60), (48, -34), (-10, 7)))
    poly = ((-40 * x + c3) * x + c2) * x**2 + c1 * x + c0  # -40x^4 + (80 - 40 s2) x^3 - (88 - 60 s2) x^2 + ...
    # kauri: a41 = beta (2x - s2) poly / (8 (x - 1)(2x^2 - 1)), 2x^2 - 1 = (2x - s2)(2x + s2) / 2
    a41 = beta * poly / (4 * (x - 1) * (2 * x + s2))
    a42 = 0.5 * (2 - s2) * x * (x - 1) * (4 * x + s2 - 2) * beta
    # kauri: a43 = (2 - s2)(2x - s2)(2 + s2 - 2x)(x - 1)(2x - 1) / (4 (2x^2 - 1)(2x^2 - 4x + 1))
    a43 = -(2 - s2) * (x - 1) * (2 * x - 1) / ((2 * x + s2) * (2 * x - 2 + s2))
    b = (x, (2 - s2) / 2 - (1 - s2) * x, (1 - s2) * (x - 1), (2 - s2) / 2 - x)
    name = f"EES(2,7;{x:g})" if plus else f"EES(2,7;{x:g},minus)"
    return Tableau(name, ((), (a21,), (a31, a32), (a41, a42, a43)), b, 2, 7)


EULER = Tableau("Euler", ((),), (1.0,), 1, 1)
HEUN = Tableau("Heun", ((), (1.0,)), (0.5, 0.5), 2, 3)
MIDPOINT = Tableau("Midpoint", ((), (0.5,)), (0.0, 1.0), 2, 3)
RALSTON = Tableau("Ralston", ((), (2 / 3,)), (0.25, 0.75), 2, 3)
RK4 = Tableau("RK4", ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6), 4, 5)

# The authors' chosen members, in closed form (daniil-shmelev/torchsde tableaus/ees.py,
# daniil-shmelev/diffrax ees25.py / ees27.py); tests pin them against the family formulas.
EES25 = Tableau("EES(2,5)", ((), (1 / 3,), (-5 / 48, 15 / 16)), (1 / 10, 1 / 2, 2 / 5), 2, 5)
# NOTE: one aggregator flags a42 as printed in the paper's figure; the authors' code agrees with
# the family formula at x = (5 - 3 sqrt2)/14, which is what we use.
EES27 = Tableau(
    "EES(2,7)",
    (
        (),
        ((2 - SQRT2) / 3,),
        ((SQRT2 - 4) / 24, (4 + SQRT2) / 8),
        ((145 * SQRT2 - 176) / 168, 3 * (8 - 5 * SQRT2) / 56, 3 * (3 - SQRT2) / 7),
    ),
    ((5 - 3 * SQRT2) / 14, (3 + SQRT2) / 14, 3 * (2 * SQRT2 - 1) / 14, (9 - 4 * SQRT2) / 14),
    2,
    7,
)

TABLEAUX: dict[str, Tableau] = {
    "euler": EULER,
    "heun": HEUN,
    "midpoint": MIDPOINT,
    "ralston": RALSTON,
    "rk4": RK4,
    "ees25": EES25,
    "ees27": EES27,
}


def get_tableau(name: str | Tableau) -> Tableau:
    """A tableau by registry name (``euler``, ``heun``, ``midpoint``, ``ralston``, ``rk4``, ``ees25``, ``ees27``)."""
    if isinstance(name, Tableau):
        return name
    try:
        return TABLEAUX[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown tableau {name!r}; choose one of {', '.join(TABLEAUX)}") from None
