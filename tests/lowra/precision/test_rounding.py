"""The LP optimum rounded down: a feasible plan within one segment of the bound; the planner keeps the
better of it and the two-stage plan."""

from __future__ import annotations

import numpy as np
import pytest
from precision_testutils import assert_budget, plan_sse, small_table

from lowra.precision import assign_precision
from lowra.precision.bounds import _group_lp_bounds, _hull_segments
from lowra.precision.problem import _prepare
from lowra.precision.rounding import _lp_rounding


@pytest.mark.parametrize(("budget", "scope"), [(1.15, "model"), (1.5, "model"), (2.5, "model"), (2.0, "matrix")])
def test_rounding_is_feasible_and_within_one_segment_of_the_bound(budget, scope):
    e, n, sizes = small_table(4, candidates=(1, 2, 3, 4))
    p = _prepare(e, n, budget, (1, 2, 3, 4), scope, sizes, None, None)
    seg = _hull_segments(p.e, p.w)
    bound = _group_lp_bounds(p, seg)[0]
    jidx = _lp_rounding(p, seg)
    used = np.zeros(p.cap.shape[0], dtype=np.int64)
    np.add.at(used, p.group, p.w[np.arange(e.shape[0]), jidx])
    assert (used <= p.cap).all()
    sse = np.bincount(p.group, weights=p.e[np.arange(e.shape[0]), jidx], minlength=p.cap.shape[0])
    assert (sse >= bound - 1e-9 * bound).all()
    assert (sse - bound <= seg.de.max() + 1e-12).all()  # at most the one segment the LP cut


def test_planner_keeps_the_better_plan():
    e, n, sizes = small_table(2, candidates=(1, 2, 3, 4))
    plan = assign_precision(e, n, 1.5, candidates=(1, 2, 3, 4), layer_sizes=sizes)
    info = plan.info
    assert info["plan_source"] in ("two-stage", "lp rounding")
    assert plan.objective == pytest.approx(min(info["two_stage_objective"], info["lp_rounding_objective"]))
    assert plan.objective == pytest.approx(plan_sse(e, plan.bits, (1, 2, 3, 4)))
    assert_budget(plan.bits, n, 1.5)
