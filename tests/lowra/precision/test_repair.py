"""Repair (lowra/precision/repair.py): exact-integer budget rows restored by local moves."""

from __future__ import annotations

import numpy as np
from precision_testutils import assert_budget, small_table

from lowra.precision.problem import _prepare
from lowra.precision.repair import _repair


def test_repair_restores_both_budget_rows() -> None:
    """The exact-integer repair fixes any plan (here: random) that breaks the budget rows."""
    e, n, _ = small_table(6)
    rng = np.random.default_rng(0)
    for budget in (1.15, 2.5):
        p = _prepare(e, n, budget, (1, 2, 4), "model", None, None)
        for _ in range(3):
            jidx = rng.integers(0, 3, size=n.shape[0])
            fixed, moves, filled = _repair(p, jidx)
            assert moves > 0 and filled
            assert_budget(np.array([1, 2, 4])[fixed], n, budget)


def test_repair_pair_exchange_when_no_single_upgrade_fits() -> None:
    """All channels at 2 or 4 bits and a slack of 1.5 channels: only an exchange (one 2->4,
    another 2->1, net +1 channel of bits) reaches the fill row."""
    n = np.full(10, 100)
    e = np.tile([[9.0, 3.0, 0.5]], (10, 1)) * (1 + 0.01 * np.arange(10))[:, None]
    p = _prepare(e, n, 2.95, (1, 2, 4), "model", None, None)
    jidx = np.array([2] * 4 + [1] * 6)  # 2,800 bits of a 2,950 cap
    fixed, moves, filled = _repair(p, jidx)
    assert filled and moves == 1
    assert_budget(np.array([1, 2, 4])[fixed], n, 2.95)
