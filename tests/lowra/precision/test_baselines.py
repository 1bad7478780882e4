"""Baselines (lowra/precision/baselines.py): greedy and uniform against the exact ILP."""

from __future__ import annotations

from precision_testutils import plan_sse, small_table

from lowra.precision.baselines import exact_assignment, greedy_assignment, uniform_assignment


def test_baselines() -> None:
    e, n, _ = small_table(10)
    _, obj_x, _ = exact_assignment(e, n, 1.5)
    g = greedy_assignment(e, n, 1.5)
    assert (n * g).sum() <= 1.5 * n.sum()
    assert plan_sse(e, g, (1, 2, 4)) >= obj_x * (1 - 1e-9)
    assert uniform_assignment(n, 1.5) is None
    u = uniform_assignment(n, 2.0)
    assert u is not None and (u == 2).all()
