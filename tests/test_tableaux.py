"""Butcher tableaus: order conditions, the EES families against their fixed members and closed forms,
stability polynomials, and bad parameters."""

import math

import numpy as np
import pytest

from diffinv.tableaux import EES25, EES27, EULER, HEUN, MIDPOINT, RALSTON, RK4, TABLEAUX, Tableau, ees25, ees27

S2 = math.sqrt(2.0)


def _arrays(tab: Tableau) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = tab.stages
    a = np.zeros((s, s))
    for i, row in enumerate(tab.a):
        a[i, : len(row)] = row
    return a, np.array(tab.b), np.array(tab.c)


def order_conditions(tab: Tableau) -> dict[int, list[float]]:
    """Residuals of the 1 + 1 + 2 + 4 rooted-tree order conditions of orders 1..4."""
    a, b, c = _arrays(tab)
    return {
        1: [b.sum() - 1],
        2: [b @ c - 1 / 2],
        3: [b @ c**2 - 1 / 3, b @ a @ c - 1 / 6],
        4: [b @ c**3 - 1 / 4, (b * c) @ a @ c - 1 / 8, b @ a @ c**2 - 1 / 12, b @ a @ a @ c - 1 / 24],
    }


def stability_coefficients(tab: Tableau) -> np.ndarray:
    """Coefficients of ``R(z) = 1 + sum_k z^k b^T A^(k-1) 1`` (a polynomial of degree ``stages``)."""
    a, b, _ = _arrays(tab)
    coef, v = [1.0], np.ones(tab.stages)
    for _ in range(tab.stages):
        coef.append(float(b @ v))
        v = a @ v
    return np.array(coef)


@pytest.mark.parametrize("name", list(TABLEAUX))
def test_order_conditions_hold_to_declared_order_and_not_beyond(name):
    tab = TABLEAUX[name]
    residuals = order_conditions(tab)
    for p in range(1, tab.order + 1):
        assert max(map(abs, residuals[p])) < 1e-14, f"{name}: order-{p} residuals {residuals[p]}"
    if tab.order < 4:  # the declared order is the true one: some condition of the next order fails
        assert max(map(abs, residuals[tab.order + 1])) > 1e-3, f"{name}: order is higher than {tab.order}"


def test_nodes_are_row_sums():
    assert EES27.c == pytest.approx(((0.0, (2 - S2) / 3, (2 + S2) / 6, (4 + S2) / 6)), abs=2e-16)
    assert EES25.c == pytest.approx((0.0, 1 / 3, 5 / 6), abs=2e-16)


@pytest.mark.parametrize("name", list(TABLEAUX))
def test_antisymmetric_order_on_the_linear_test_equation(name):
    """``R(z) R(-z) = 1 + O(z^(q+1))`` with a non-zero ``z^(q+1)`` term, q the antisymmetric order."""
    tab = TABLEAUX[name]
    r = np.polynomial.Polynomial(stability_coefficients(tab))
    prod = (r * np.polynomial.Polynomial(r.coef * (-1.0) ** np.arange(r.coef.size))).coef
    q = tab.antisymmetric_order
    assert abs(prod[0] - 1) < 1e-15
    assert np.abs(prod[1 : q + 1]).max() < 1e-14, f"{name}: {prod}"
    assert abs(prod[q + 1]) > 1e-4, f"{name}: z^{q + 1} coefficient vanishes: {prod}"
    leading = {"ees25": -1 / 64, "ees27": 17 / 64 - 3 * S2 / 16, "heun": 1 / 4, "euler": -1.0}  # solvers.md §3.3/3.4
    if name in leading:
        assert prod[q + 1] == pytest.approx(leading[name], abs=1e-15)


def test_stability_polynomials():
    assert stability_coefficients(EES25) == pytest.approx([1, 1, 1 / 2, 1 / 8], abs=1e-15)
    assert stability_coefficients(EES27) == pytest.approx([1, 1, 1 / 2, 1 / 2 - S2 / 4, 3 / 8 - S2 / 4], abs=1e-15)
    assert stability_coefficients(RK4) == pytest.approx([1, 1, 1 / 2, 1 / 6, 1 / 24], abs=1e-15)
    for tab in (HEUN, MIDPOINT, RALSTON):
        assert stability_coefficients(tab) == pytest.approx([1, 1, 1 / 2], abs=1e-15)
    assert stability_coefficients(EULER) == pytest.approx([1, 1], abs=0)


def _max_diff(t1: Tableau, t2: Tableau) -> float:
    da = [abs(u - v) for r1, r2 in zip(t1.a, t2.a, strict=True) for u, v in zip(r1, r2, strict=True)]
    db = [abs(u - v) for u, v in zip(t1.b, t2.b, strict=True)]
    return max(da + db)


def test_families_reproduce_the_fixed_members():
    assert _max_diff(ees25(1 / 10), EES25) <= 1e-15
    assert _max_diff(ees27((5 - 3 * S2) / 14), EES27) <= 1e-15
    assert _max_diff(ees25(), EES25) <= 1e-15 and _max_diff(ees27(), EES27) <= 1e-15


def test_fixed_members_closed_forms():
    # solvers.md §3.3 and §3.4 (authors' code, daniil-shmelev/diffrax ees25.py / ees27.py)
    assert EES25.a == ((), (1 / 3,), (-5 / 48, 15 / 16))
    assert EES25.b == (1 / 10, 1 / 2, 2 / 5)
    exact_a = (
        (),
        ((2 - S2) / 3,),
        ((S2 - 4) / 24, (4 + S2) / 8),
        ((145 * S2 - 176) / 168, 3 * (8 - 5 * S2) / 56, 3 * (3 - S2) / 7),
    )
    exact_b = ((5 - 3 * S2) / 14, (3 + S2) / 14, 3 * (2 * S2 - 1) / 14, (9 - 4 * S2) / 14)
    assert _max_diff(EES27, Tableau("exact", exact_a, exact_b, 2, 7)) <= 2e-16
    # the decimals printed in §3.4 (17 significant digits; float evaluation of the closed forms is within a few ulp)
    assert EES27.a[3][1] == pytest.approx(0.04976422436434954, abs=2e-16)
    assert EES27.a[3][0] == pytest.approx(0.17298194371487370, abs=2e-16)
    decimals_b = (0.05409709377719392, 0.31530096874093536, 0.39180581244561216, 0.23879612503625856)
    assert EES27.b == pytest.approx(decimals_b, abs=2e-16)


FAMILY_POINTS = [
    ("ees25", x, True) for x in (-2.0, -0.3, 0.0, 0.1, 0.25, 0.7, 3.0)
] + [  # includes points where kauri's formulas are 0/0 but the family is continuous (1/sqrt2, (1+sqrt2)/2, ...)
    ("ees27", x, plus)
    for plus in (True, False)
    for x in (-1.5, -0.4, 0.0, 0.05, 0.3, 0.6, 2.0, 1 / S2, -1 / S2, (1 + S2) / 2, (1 - S2) / 2, 1 + S2 / 2, 1 - S2 / 2)
    if (x, plus) not in {(-1 / S2, True), ((1 - S2) / 2, True), (1 - S2 / 2, True)}
    and (x, plus) not in {(1 / S2, False), ((1 + S2) / 2, False), (1 + S2 / 2, False)}
]


@pytest.mark.parametrize(("family", "x", "plus"), FAMILY_POINTS)
def test_family_members_are_order_two_and_effectively_symmetric(family, x, plus):
    tab = ees25(x) if family == "ees25" else ees27(x, plus)
    residuals = order_conditions(tab)
    scale = max(1.0, max(abs(v) for row in tab.a for v in row))
    assert max(abs(r) for p in (1, 2) for r in residuals[p]) < 1e-13 * scale
    r = np.polynomial.Polynomial(stability_coefficients(tab))
    prod = (r * np.polynomial.Polynomial(r.coef * (-1.0) ** np.arange(r.coef.size))).coef
    assert np.abs(prod[1 : tab.antisymmetric_order + 1]).max() < 1e-12 * scale**4, prod


@pytest.mark.parametrize(
    ("family", "x", "plus"),
    [("ees25", 1.0, True), ("ees25", 0.5, True), ("ees25", -0.5, True), ("ees25", 0.5 + 1e-13, True)]
    + [("ees27", x, True) for x in (1.0, 0.5, (1 - S2) / 2, 1 - S2 / 2, -S2 / 2, float("nan"))]
    + [("ees27", x, False) for x in (1.0, 0.5, (1 + S2) / 2, 1 + S2 / 2, S2 / 2)],
)
def test_undefined_parameters_raise(family, x, plus):
    with pytest.raises(ValueError, match="undefined at x"):
        ees25(x) if family == "ees25" else ees27(x, plus)


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (((), (1.0,)), (0.5,), "lower triangular"),
        (((), (1.0, 2.0)), (0.5, 0.5), "lower triangular"),
        (((), (1.0,)), (0.5, 0.6), "sum to 1"),
        (((), (float("inf"),)), (0.5, 0.5), "finite"),
        ((), (), "at least one stage"),
    ],
)
def test_malformed_tableau_rejected(a, b, match):
    with pytest.raises(ValueError, match=match):
        Tableau("bad", a, b, 1, 1)
