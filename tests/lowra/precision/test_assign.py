"""The two-stage planner end to end (lowra/precision/assign.py), and the package's public API.

What must hold: the budget is never exceeded and is used up to max(n_c)/sum(n_c); the plan is
within 0.5 % of the exact flat ILP (HiGHS) on small instances; bad inputs raise ValueError
naming the problem.  The stages have their own tests beside this file (bounds, stage 2,
repair, baselines).  Timings are the benchmark's business (experiments/bench/pipeline.py), not
asserted here.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from precision_testutils import (
    SMALL,
    TINY,
    assert_budget,
    assert_cost_budget,
    plan_sse,
    small_table,
    stored_costs,
)

from lowra.precision import (
    PrecisionPlan,
    assign_precision,
    exact_assignment,
    greedy_assignment,
    llama_layer_shapes,
    lp_lower_bound,
    synthetic_error_table,
)


# ------------------------------------------------------------------------------------------
# Optimality against the exact ILP
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget", [1.15, 2.0, 2.5])
def test_within_half_percent_of_exact_ilp(seed: int, budget: float) -> None:
    e, n, sizes = small_table(seed)
    plan = assign_precision(e, n, budget, seed=seed, layer_sizes=sizes)
    bits_x, obj_x, info = exact_assignment(e, n, budget)
    assert info["status"] == "optimal"
    assert_budget(plan.bits, n, budget)
    assert_budget(bits_x, n, budget)
    assert plan.lower_bound <= obj_x * (1 + 1e-9)
    assert plan.objective >= obj_x * (1 - 1e-9)  # nothing beats the exact optimum
    assert plan.objective <= obj_x * 1.005
    assert plan.objective == pytest.approx(plan_sse(e, plan.bits, (1, 2, 4)), rel=1e-12)


def test_candidates_1234_within_half_percent() -> None:
    cands = (1, 2, 3, 4)
    e, n, sizes = small_table(3, candidates=cands)
    for budget in (1.5, 2.75):
        plan = assign_precision(e, n, budget, candidates=cands, layer_sizes=sizes)
        _, obj_x, _ = exact_assignment(e, n, budget, candidates=cands)
        assert set(np.unique(plan.bits)) <= set(cands)
        assert_budget(plan.bits, n, budget)
        assert obj_x * (1 - 1e-9) <= plan.objective <= obj_x * 1.005


def test_mean_cost_model_is_valid_and_close() -> None:
    """samples=0 is the paper's cluster-mean stage-1 cost: valid, and still near-optimal."""
    e, n, sizes = small_table(4)
    plan = assign_precision(e, n, 1.5, samples=0, layer_sizes=sizes)
    _, obj_x, _ = exact_assignment(e, n, 1.5)
    assert_budget(plan.bits, n, 1.5)
    assert plan.objective <= obj_x * 1.005
    assert plan.stage1_objective >= plan.objective * (1 - 1e-9)  # stage 1 is an upper bound


def test_per_matrix_scope_each_matrix_meets_budget() -> None:
    e, n, sizes = small_table(5)
    plan = assign_precision(e, n, 1.5, scope="matrix", layer_sizes=sizes, clusters=16)
    _, obj_x, _ = exact_assignment(e, n, 1.5, scope="matrix", layer_sizes=sizes)
    for b, nn in zip(plan.split(), np.split(n, np.cumsum(sizes)[:-1])):
        assert_budget(b, nn, 1.5)
    assert obj_x * (1 - 1e-9) <= plan.objective <= obj_x * 1.005
    flat = lp_lower_bound(e, n, 1.5)
    assert plan.lower_bound >= flat * (1 - 1e-12)  # per-matrix budgets only constrain more


# ------------------------------------------------------------------------------------------
# Bit costs (budget in stored bits)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cands,budget,scope", [((1, 2, 4), 2.4, "model"),
                                                ((1, 2, 4), 4.5, "model"),
                                                ((1, 2, 3, 4), 3.3, "model"),
                                                ((1, 2, 4), 3.0, "matrix")])
def test_bit_costs_within_half_percent_of_exact_ilp(cands, budget: float, scope: str) -> None:
    e, n, sizes = synthetic_error_table(TINY, candidates=cands, seed=21)
    w = stored_costs(n, cands)
    plan = assign_precision(e, n, budget, cands, scope=scope, layer_sizes=sizes, bit_costs=w)
    bits_x, obj_x, info = exact_assignment(e, n, budget, cands, scope=scope,
                                           layer_sizes=sizes, bit_costs=w)
    assert info["status"] == "optimal"
    groups = (zip(plan.split(), np.split(np.arange(n.shape[0]), np.cumsum(sizes)[:-1]))
              if scope == "matrix" else [(plan.bits, np.arange(n.shape[0]))])
    for b, idx in groups:
        assert_cost_budget(b, w[idx], n[idx], cands, budget)
    assert_cost_budget(bits_x, w, n, cands, budget)
    assert plan.lower_bound <= obj_x * (1 + 1e-9)
    assert lp_lower_bound(e, n, budget, cands, scope=scope, layer_sizes=sizes,
                          bit_costs=w) == plan.lower_bound
    assert obj_x * (1 - 1e-9) <= plan.objective <= obj_x * 1.005
    assert plan.objective == pytest.approx(plan_sse(e, plan.bits, cands), rel=1e-12)
    used = int(w[np.arange(n.shape[0]), np.searchsorted(np.asarray(cands), plan.bits)].sum())
    assert plan.average_cost_bits == used / int(n.sum()) <= budget
    assert plan.average_bits == int((n * plan.bits).sum()) / int(n.sum())
    assert plan.average_bits < plan.average_cost_bits  # the codebook share is not free
    assert plan.summary()["average_cost_bits"] == plan.average_cost_bits
    g = greedy_assignment(e, n, budget, cands, scope=scope, layer_sizes=sizes, bit_costs=w)
    wg = w[np.arange(n.shape[0]), np.searchsorted(np.asarray(cands), g)]
    for _, idx in groups:  # the greedy baseline also respects the costed budget
        assert int(wg[idx].sum()) <= Fraction(repr(budget)) * int(n[idx].sum())
    assert plan_sse(e, g, cands) >= obj_x * (1 - 1e-9)


@pytest.mark.parametrize("cands,budget,scope,kw", [((1, 2, 4), 1.15, "model", {}),
                                                   ((1, 2, 4), 2.5, "matrix", {"clusters": 16}),
                                                   ((1, 2, 3, 4), 2.75, "model", {}),
                                                   ((2, 4, 8), 3.3, "model", {"samples": 0})])
def test_bit_costs_n_times_candidates_is_the_default(cands, budget, scope, kw) -> None:
    """``bit_costs = n * cand`` (columns in the caller's order) gives the default plan bit for
    bit, and the default plan is what the planner gave before costs existed (checked on 84
    plans, bounds and baselines when costs were added)."""
    e, n, sizes = synthetic_error_table(TINY, candidates=cands, seed=5)
    w = n[:, None] * np.asarray(cands)[None, :]
    ref = assign_precision(e, n, budget, cands, scope=scope, layer_sizes=sizes, **kw)
    got = assign_precision(e, n, budget, cands, scope=scope, layer_sizes=sizes, bit_costs=w,
                           **kw)
    assert np.array_equal(ref.bits, got.bits)
    assert (ref.objective, ref.lower_bound) == (got.objective, got.lower_bound)
    assert ref.average_cost_bits is None and got.average_cost_bits == got.average_bits
    perm = np.roll(np.arange(len(cands)), 1)  # columns in the order of shuffled candidates
    shuffled = assign_precision(e[:, perm], n, budget, [cands[i] for i in perm], scope=scope,
                                layer_sizes=sizes, bit_costs=w[:, perm], **kw)
    assert np.array_equal(ref.bits, shuffled.bits)
    assert np.array_equal(greedy_assignment(e, n, budget, cands, scope=scope, layer_sizes=sizes),
                          greedy_assignment(e, n, budget, cands, scope=scope, layer_sizes=sizes,
                                            bit_costs=w))


def test_bit_costs_value_errors() -> None:
    e, n, sizes = synthetic_error_table(TINY, seed=6)
    w = stored_costs(n, (1, 2, 4))
    cases = [(w[:, :2], "bit_costs must have shape"), (w[:-1], "bit_costs must have shape"),
             (w + 0.5, "bit_costs must be integers"), (w.astype(str), "bit_costs"),
             (w - w[:, :1], "bit_costs must be positive"),
             (w[:, [0, 2, 1]], "bit_costs must increase"),
             (np.where(np.arange(3) == 1, w[:, :1], w), "bit_costs must increase")]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            assign_precision(e, n, 2.0, bit_costs=bad)
    nanw = w.astype(np.float64)
    nanw[4, 1] = np.nan
    with pytest.raises(ValueError, match="bit_costs contains NaN"):
        lp_lower_bound(e, n, 2.0, bit_costs=nanw)
    least = float(w[:, 0].sum() / n.sum())  # 2.125: above candidates[0], below every plan
    with pytest.raises(ValueError, match="below the cheapest plan under bit_costs"):
        greedy_assignment(e, n, least - 0.01, bit_costs=w)
    most = float(w[:, -1].sum() / n.sum())
    with pytest.raises(ValueError, match="above the most expensive plan under bit_costs"):
        exact_assignment(e, n, most + 0.01, bit_costs=w)
    with pytest.raises(ValueError, match="in budget group"):  # per matrix
        assign_precision(e, n, least + 0.05, scope="matrix", layer_sizes=sizes, bit_costs=w)
    plan = assign_precision(e, n, least + 1e-3, bit_costs=w)  # just feasible: all narrowest
    assert (plan.bits == 1).all()


# ------------------------------------------------------------------------------------------
# Budget
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [1.0, 1.01, 1.15, 1.9, 2.25, 3.0, 3.99, 4.0])
def test_budget_never_exceeded_and_used(budget: float) -> None:
    e, n, sizes = synthetic_error_table(llama_layer_shapes(2, 128, 320), seed=7)
    plan = assign_precision(e, n, budget, clusters=32, layer_sizes=sizes)
    assert_budget(plan.bits, n, budget)
    assert plan.average_bits <= budget  # also after float rounding
    assert plan.lower_bound <= plan.objective * (1 + 1e-12)
    assert plan.gap >= -1e-12


# ------------------------------------------------------------------------------------------
# API, determinism
# ------------------------------------------------------------------------------------------
def test_plan_fields_split_and_determinism() -> None:
    import torch

    e, n, sizes = small_table(8)
    plan = assign_precision(e, n, 1.5, layer_sizes=sizes, seed=3)
    again = assign_precision(torch.from_numpy(e), torch.from_numpy(n), 1.5,
                             layer_sizes=sizes, seed=3)
    assert isinstance(plan, PrecisionPlan)
    assert np.array_equal(plan.bits, again.bits)
    assert plan.bits.dtype == np.int64 and plan.bits.shape == (n.shape[0],)
    assert "HIGHS" in plan.solver
    assert set(plan.times) >= {"cluster", "bound", "stage1", "stage2", "repair", "total"}
    parts = plan.split()
    assert [p.shape[0] for p in parts] == sizes
    avg = plan.layer_average_bits()
    assert avg.shape == (len(sizes),)
    assert float((avg * [s * i for s, (_, i) in zip(sizes, SMALL)]).sum() / n.sum()) == \
        pytest.approx(plan.average_bits)
    assert sum(plan.counts().values()) == n.shape[0]
    s = plan.summary()
    assert s["channels"] == n.shape[0] and s["gap"] == plan.gap
    ids = np.repeat(np.arange(len(sizes))[::-1], sizes)  # layer ids instead of sizes
    by_id = assign_precision(e, n, 1.5, layer_ids=ids, seed=3)
    assert [p.shape[0] for p in by_id.split()] == sizes[::-1]
    assert np.array_equal(by_id.split()[-1], by_id.bits[:sizes[0]])


def test_solver_options_pass_through() -> None:
    e, n, _ = small_table(9)
    plan = assign_precision(e, n, 1.5, time_limit=30.0, threads=1, mip_rel_gap=1e-4,
                            solver_options={"presolve": "off"})
    assert_budget(plan.bits, n, 1.5)
    with pytest.raises(ValueError, match="no_such_option"):
        assign_precision(e, n, 1.5, solver_options={"no_such_option": 1})


def test_degenerate_inputs() -> None:
    """Equal errors at every width (no upgrade helps), identical rows, tiny problems."""
    n = np.full(50, 64)
    flat = np.ones((50, 3))
    plan = assign_precision(flat, n, 1.5)
    assert plan.objective == 50 and plan.average_bits <= 1.5
    same = np.tile([[9.0, 3.0, 0.5]], (50, 1))
    plan = assign_precision(same, n, 2.5)
    assert_budget(plan.bits, n, 2.5)
    assert plan.objective == pytest.approx(exact_assignment(same, n, 2.5)[1])
    one = assign_precision(np.array([[4.0, 2.0, 1.0]]), [10], 2.0)
    assert one.bits.tolist() == [2]


def test_unsorted_and_single_candidates() -> None:
    e, n, _ = small_table(12)
    plan = assign_precision(e, n, 1.5)
    perm = [2, 0, 1]  # columns in the order of candidates (4, 1, 2)
    shuffled = assign_precision(e[:, perm], n, 1.5, candidates=(4, 1, 2))
    assert shuffled.candidates == (1, 2, 4)
    assert np.array_equal(plan.bits, shuffled.bits)
    single = assign_precision(e[:, 1:2], n, 2.0, candidates=(2,))
    assert (single.bits == 2).all() and single.objective == pytest.approx(e[:, 1].sum())


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------
def test_value_errors_name_the_problem() -> None:
    e, n, sizes = small_table(11)
    with pytest.raises(ValueError, match="below the smallest"):
        assign_precision(e, n, 0.9)
    with pytest.raises(ValueError, match="above the largest"):
        assign_precision(e, n, 4.5)
    with pytest.raises(ValueError, match="columns"):
        assign_precision(e[:, :2], n, 1.5)
    with pytest.raises(ValueError, match="params"):
        assign_precision(e, n[:-1], 1.5)
    bad = e.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        assign_precision(bad, n, 1.5)
    bad[3, 1] = -1.0
    with pytest.raises(ValueError, match="negative"):
        assign_precision(bad, n, 1.5)
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="inf"):
        assign_precision(bad, n, 1.5)
    with pytest.raises(ValueError, match="positive integers"):
        assign_precision(e, n + 0.5, 1.5)
    with pytest.raises(ValueError, match="finite"):
        assign_precision(e, n, float("nan"))
    with pytest.raises(ValueError, match="layer_sizes"):
        assign_precision(e, n, 1.5, scope="matrix")
    with pytest.raises(ValueError, match="sum"):
        assign_precision(e, n, 1.5, scope="matrix", layer_sizes=[10, 20])
    with pytest.raises(ValueError, match="scope"):
        assign_precision(e, n, 1.5, scope="layer")
    with pytest.raises(ValueError, match="duplicates"):
        assign_precision(e, n, 1.5, candidates=(1, 2, 2))


# ------------------------------------------------------------------------------------------
# Scale (slow)
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gap_to_lp_bound_at_scale() -> None:
    """Four Llama-2-7B blocks (170 k channels): within 0.1 % of the LP bound."""
    e, n, sizes = synthetic_error_table(llama_layer_shapes(4, 4096, 11008), seed=0)
    for budget in (1.15, 2.5):
        plan = assign_precision(e, n, budget, layer_sizes=sizes)
        assert_budget(plan.bits, n, budget)
        assert 0 <= plan.gap <= 1e-3


def test_package_reexports_every_name_it_had() -> None:
    """``lowra.precision`` exports its public names, each the stage module's object (the stages'
    private helpers are imported from their own modules, never re-exported)."""
    import lowra.precision as P
    from lowra.precision import assign, baselines, bounds, plan, synthetic

    assert set(P.__all__) == {"PrecisionPlan", "assign_precision", "lp_lower_bound", "exact_assignment",
                              "greedy_assignment", "uniform_assignment", "synthetic_error_table",
                              "llama_layer_shapes"}
    homes = {"PrecisionPlan": plan, "assign_precision": assign, "lp_lower_bound": bounds,
             "exact_assignment": baselines, "greedy_assignment": baselines, "uniform_assignment": baselines,
             "synthetic_error_table": synthetic, "llama_layer_shapes": synthetic}
    for name, module in homes.items():
        assert getattr(P, name) is getattr(module, name), name
    assert not [n for n in vars(P) if n.startswith("_") and not n.startswith("__")
                and not isinstance(getattr(P, n), type(P))]
