"""The LP bound (lowra/precision/bounds.py): the hull greedy equals HiGHS' LP optimum."""

from __future__ import annotations

from fractions import Fraction

import cvxpy as cp
import numpy as np
import pytest

from lowra.precision.bounds import lp_lower_bound


@pytest.mark.parametrize("cands", [(1, 2, 4), (1, 2, 3, 4), (2, 3, 8)])
def test_lp_bound_equals_highs_lp(cands) -> None:
    """The hull-greedy bound is the LP optimum, also for non-convex / non-monotone errors."""
    rng = np.random.default_rng(1)
    C, K = 300, len(cands)
    e = rng.gamma(2.0, 1.0, size=(C, K)) * np.exp(-0.7 * np.arange(K))
    e[:40] = rng.gamma(2.0, 1.0, size=(40, K))  # arbitrary, possibly increasing errors
    n = rng.choice([64, 96, 160], size=C)
    budget = (cands[0] + cands[-1]) / 2 + 0.1
    x = cp.Variable((C, K), nonneg=True)
    cap = int(np.floor(Fraction(repr(budget)) * int(n.sum())))
    lp = cp.Problem(cp.Minimize(cp.sum(cp.multiply(e, x))),
                    [cp.sum(x, axis=1) == 1,
                     cp.sum(cp.multiply(x @ np.asarray(cands), n)) <= cap])
    lp.solve(solver=cp.HIGHS)
    assert lp_lower_bound(e, n, budget, cands) == pytest.approx(lp.value, rel=1e-9)


def test_bit_costs_lp_bound_equals_highs_lp() -> None:
    """The hull greedy over per-row costs is the LP optimum, also for non-convex errors and
    costs that differ per row (so hulls differ per row even for equal errors)."""
    rng = np.random.default_rng(3)
    cands = (1, 2, 3, 4)
    C, K = 300, len(cands)
    e = rng.gamma(2.0, 1.0, size=(C, K)) * np.exp(-0.7 * np.arange(K))
    e[:40] = rng.gamma(2.0, 1.0, size=(40, K))
    n = rng.choice([64, 96, 160], size=C)
    w = np.cumsum(rng.integers(1, 300, size=(C, K)), axis=1) + n[:, None]
    budget = 4.1
    x = cp.Variable((C, K), nonneg=True)
    cap = int(np.floor(Fraction(repr(budget)) * int(n.sum())))
    lp = cp.Problem(cp.Minimize(cp.sum(cp.multiply(e, x))),
                    [cp.sum(x, axis=1) == 1, cp.sum(cp.multiply(x, w)) <= cap])
    lp.solve(solver=cp.HIGHS)
    assert lp_lower_bound(e, n, budget, cands, bit_costs=w) == pytest.approx(lp.value, rel=1e-9)
