"""Tests of the two-stage ILP precision assignment (lowra/precision.py).

What must hold: the budget is never exceeded and is used up to max(n_c)/sum(n_c); the plan is
within 0.5 % of the exact flat ILP (HiGHS) on small instances; the LP bound equals HiGHS' LP;
stage 2 is exact for any counts; bad inputs raise ValueError naming the problem.
Timings are the benchmark's business (experiments/bench_pipeline.py), not asserted here.
"""

from __future__ import annotations

from fractions import Fraction

import cvxpy as cp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from lowra.precision import (
    PrecisionPlan,
    _ClusterPaths,
    _hull_segments,
    _prepare,
    _repair,
    _stage2,
    assign_precision,
    exact_assignment,
    greedy_assignment,
    llama_layer_shapes,
    lp_lower_bound,
    synthetic_error_table,
    uniform_assignment,
)

# 4*192 + 2*384 + 192 = 1,728 channels of 192 and 384 inputs: a miniature Llama block.
SMALL = llama_layer_shapes(1, 192, 384)


def small_table(seed: int, candidates=(1, 2, 4)):
    return synthetic_error_table(SMALL, candidates=candidates, seed=seed)


def plan_sse(e: np.ndarray, bits: np.ndarray, candidates) -> float:
    col = np.searchsorted(np.asarray(candidates), bits)
    return float(e[np.arange(e.shape[0]), col].sum())


def assert_budget(bits: np.ndarray, n: np.ndarray, budget: float) -> None:
    """Never above the budget (exact rationals), and at most max(n) bits below it."""
    used = int((n * bits).sum())
    cap = Fraction(repr(budget)) * int(n.sum())
    assert used <= cap
    assert cap - used <= int(n.max())


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
# 4*64 + 2*128 + 64 = 576 channels of 64 and 128 inputs: two partitions, exact ILP in ~1 s.
TINY = llama_layer_shapes(1, 64, 128)


def stored_costs(n: np.ndarray, cands) -> np.ndarray:
    """Non-proportional costs: code bits, a per-row fp16 codebook (16 * 2**b) and a constant
    (scale + row index), ``[C, K]`` int64."""
    c = np.asarray(cands)
    return n[:, None] * c[None, :] + 16 * 2 ** c[None, :] + 48


def assert_cost_budget(bits: np.ndarray, w: np.ndarray, n: np.ndarray, cands,
                       budget: float) -> None:
    """Never above the budget in exact integer arithmetic, and within one cost step of it."""
    used = int(w[np.arange(n.shape[0]), np.searchsorted(np.asarray(cands), bits)].sum())
    cap = Fraction(repr(budget)) * int(n.sum())
    assert used <= cap
    assert cap - used <= int(np.diff(w, axis=1).max())


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


# ------------------------------------------------------------------------------------------
# Pieces: LP bound, stage 2
# ------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("method", ["combinatorial", "lp"])
def test_stage2_exact_for_arbitrary_counts(method: str) -> None:
    """Stage 2 (pure / path prefix / two-width sort / shortest paths or block LP) against
    brute force: each cluster as an assignment problem with width j repeated y_j times."""
    rng = np.random.default_rng(2)
    cands = np.array([1, 2, 3, 4])
    sizes = [7, 12, 25, 30, 9, 40, 33]
    lab = np.repeat(np.arange(len(sizes)), sizes)
    C, K = lab.shape[0], cands.shape[0]
    n = np.full(C, 64)
    e = n[:, None] * np.exp(rng.normal(0, 0.4, (C, 1)) - 1.2 * np.arange(K)
                            + rng.normal(0, 0.3, (C, K)))
    e[lab == 6] = rng.gamma(1.0, 1.0, size=(33, K))  # non-convex, non-monotone errors
    seg = _hull_segments(e, n[:, None] * cands[None, :])
    path = _ClusterPaths(seg, lab, np.tile(64 * cands, (len(sizes), 1)))  # n = 64 everywhere
    Y = np.zeros((len(sizes), K), dtype=np.int64)
    for k, N in enumerate(sizes):  # pure, two widths, three+ widths, random, prefix
        if k == 0:
            Y[k, 2] = N
        elif k == 1:
            Y[k, [0, 3]] = [5, N - 5]
        elif k == 5:  # counts of a prefix of the path
            m = 17
            Y[k] = path.cum_cnt[path.start[k] + m - 1]
            Y[k, 0] += N
        else:
            Y[k] = rng.multinomial(N, [0.25, 0.25, 0.25, 0.25])
    jidx, info = _stage2(e, lab, Y, path, {"verbose": False}, method)
    multi = info["stage2_lp_clusters"] if method == "lp" else info["stage2_shortest_paths"]
    assert multi >= 3 and info["stage2_two_width"] >= 1
    assert info["stage2_pure"] >= 1 and info["stage2_prefix"] >= 1
    for k in range(len(sizes)):
        chs = np.nonzero(lab == k)[0]
        assert np.array_equal(np.bincount(jidx[chs], minlength=K), Y[k])
        cols = np.repeat(np.arange(K), Y[k])
        r, c = linear_sum_assignment(e[chs][:, cols])
        best = e[chs][r, cols[c]].sum()
        assert e[chs, jidx[chs]].sum() == pytest.approx(best, rel=1e-12)


# ------------------------------------------------------------------------------------------
# API, baselines, determinism
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


def test_baselines() -> None:
    e, n, _ = small_table(10)
    _, obj_x, _ = exact_assignment(e, n, 1.5)
    g = greedy_assignment(e, n, 1.5)
    assert (n * g).sum() <= 1.5 * n.sum()
    assert plan_sse(e, g, (1, 2, 4)) >= obj_x * (1 - 1e-9)
    assert uniform_assignment(n, 1.5) is None
    u = uniform_assignment(n, 2.0)
    assert u is not None and (u == 2).all()


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
