"""The two-stage planner :func:`assign_precision`: bound, clusters, stage 1, stage 2, repair, and the
LP optimum rounded down (the better of the two plans is returned).

Each stage lives in its own module of :mod:`lowra.precision` (the package docstring has the
whole method); this function only validates, times and chains them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from lowra.precision.bounds import _group_lp_bounds, _hull_segments
from lowra.precision.efficiency_paths import _ClusterPaths
from lowra.precision.highs import DEFAULT_MAX_NODES, _solver_name
from lowra.precision.plan import PrecisionPlan
from lowra.precision.problem import _ArrayLike, _prepare, _Problem
from lowra.precision.repair import _repair
from lowra.precision.rounding import _lp_rounding
from lowra.precision.stage1 import _cluster, _stage1
from lowra.precision.stage2 import _stage2
from lowra.progress import activity


def assign_precision(
    errors: _ArrayLike,
    params: _ArrayLike,
    budget: float,
    candidates: Sequence[int] = (1, 2, 4),
    clusters: int = 128,
    seed: int = 0,
    *,
    scope: str = "model",
    layer_sizes: Sequence[int] | None = None,
    layer_ids: _ArrayLike | None = None,
    samples: int | None = None,
    time_limit: float | None = None,
    mip_rel_gap: float | None = 1e-4,
    threads: int | None = None,
    max_nodes: int | None = DEFAULT_MAX_NODES,
    solver_options: dict[str, Any] | None = None,
    kmeans_iters: int = 30,
    kmeans_sample: int = 65_536,
    stage2: str = "combinatorial",
    verbose: bool = False,
    bit_costs: _ArrayLike | None = None,
) -> PrecisionPlan:
    """Choose a bit-width per output channel at the least total SSE under an average budget.

    Args:
        errors: ``[C, K]`` SSE of every channel (rows of all quantized matrices concatenated)
            at each candidate width, in the original weight space.  Finite, ``>= 0``.
        params: ``[C]`` parameters per channel (its in-features), positive integers.
        budget: target average code bits per parameter, ``candidates[0] <= budget <=
            candidates[-1]``; never exceeded, and used up to ``max(n_c) / sum(n_c)``.
        candidates: the widths, e.g. ``(1, 2, 4)`` or ``(1, 2, 3, 4)``; columns of ``errors``.
        clusters: k-means clusters per partition (channels with equal ``n_c`` [and matrix]).
        seed: seed of the k-means++ seeding and subsample (the plan is deterministic).
        scope: ``"model"``: one budget over all channels; ``"matrix"``: every matrix meets the
            budget on its own (whole matrices batched into stage-1 programs of <= 10k points).
        layer_sizes: channels per matrix in concatenation order (or ``layer_ids [C]``);
            required by ``scope="matrix"``, used by :meth:`PrecisionPlan.split`.
        samples: points per cluster on its efficiency path in the stage-1 cost model; ``0`` is
            the paper's cluster-mean cost (see :mod:`lowra.precision.stage1`).  Default (``None``): 32
            for the model scope, 8 for the matrix scope (its clusters are split by matrix, so
            smaller, and stage 1 has ~100x more of them).
        mip_rel_gap, max_nodes: when stage 1's branch and bound stops (relative gap 1e-4, or
            ``max_nodes`` nodes, default 1,000): limits by work, so a plan is a function of its inputs
            alone, the same on a slow, loaded or many-core machine. HiGHS runs on one thread with a fixed
            seed (``threads`` other than 1 is refused: its search, and so the plan, would depend on the
            thread count). A stage 1 stopped by ``max_nodes`` still yields a valid plan; ``info`` records
            ``stage1_status`` ("node limit"), ``stage1_mip_gap`` and ``stage1_nodes``.  Measured on the
            runner's K-FAC tables (``python -m experiments.bench.plan``): 50 stories260K cases and 4 SmolLM2
            cases, ``results/bench/plan_cpu.json``.
        time_limit: a wall-clock cap on every HiGHS solve, in seconds (default None: none). A plan cut
            by the clock depends on the machine; use it only where the time matters more than that.
        solver_options: further HiGHS options (``{"presolve": "off", ...}``).
        kmeans_iters, kmeans_sample: Lloyd iterations and fitting subsample size.
        stage2: clusters with three or more widths in use are solved by successive shortest
            paths (``"combinatorial"``) or all in one block-diagonal LP (``"lp"``, CVXPY +
            HiGHS simplex); both exact.
        verbose: HiGHS log to the console.
        bit_costs: optional ``[C, K]`` positive integers, strictly increasing along each row,
            columns in the order of ``candidates``: the bits channel ``c`` costs at each width
            (e.g. code bits plus its share of codebook, scales and index: stored bits).  The
            budget then reads ``sum_c bit_costs[c, j_c] <= budget * sum_c n_c`` (``budget``
            still per parameter, ``n_c`` from ``params``) and is used up to the largest cost
            step of one channel.  Clusters are partitioned by cost vector, so rows should
            share a few distinct cost vectors (e.g. one per matrix shape); every distinct one
            gets up to ``clusters`` clusters.  ``None``: ``params[:, None] * candidates``.

    Returns:
        A :class:`PrecisionPlan`.

    Raises:
        ValueError: mismatched shapes, NaN/inf/negative errors, non-integer params, a budget
            outside ``[candidates[0], candidates[-1]]`` (with ``bit_costs``: below the cheapest
            or above the most expensive plan), malformed ``bit_costs``, an unknown scope.
    """
    t_start = time.perf_counter()
    import cvxpy  # noqa: F401  (lazy: ~3 s; imported before the stages are timed)

    p = _prepare(errors, params, budget, candidates, scope, layer_sizes, layer_ids, bit_costs)
    samples = _check_plan_options(clusters, stage2, samples, scope, threads, max_nodes)
    e = p.e
    opts: dict[str, Any] = {"verbose": verbose, "time_limit": time_limit, "threads": 1, **(solver_options or {})}
    times: dict[str, float] = {}
    info: dict[str, Any] = {}

    # ---- bound (also builds the hull segments the stage-1 samples use) ----
    with activity("plan: LP lower bound"):
        t0 = time.perf_counter()
        seg = _hull_segments(e, p.w)
        lb_groups, _ = _group_lp_bounds(p, seg)
        lower_bound = float(lb_groups.sum())
    times["bound"] = time.perf_counter() - t0

    # ---- the LP optimum rounded down (kept if it beats the two-stage plan) ----
    with activity("plan: LP rounding"):
        t0 = time.perf_counter()
        rounded = _lp_rounding(p, seg)
    times["lp_rounding"] = time.perf_counter() - t0

    # ---- clusters ----
    with activity("plan: k-means clusters"):
        t0 = time.perf_counter()
        lab = _cluster(p, int(clusters), int(seed), int(kmeans_iters), int(kmeans_sample))
        G, Nk, wk, gk = _cluster_summary(p, lab)
    times["cluster"] = time.perf_counter() - t0

    # ---- stage 1 ----
    with activity("plan: stage 1 (cluster ILP)"):
        t0 = time.perf_counter()
        path = _ClusterPaths(seg, lab, wk)
        del seg
        Y, F, pk = path.sample_points(Nk, int(samples), e, lab)
        emax, emin = _cluster_error_range(e, lab, G)
        Yint, stage1_obj, s1info = _stage1(p, Y, F, pk, Nk, wk, gk, emax, emin,
                                           _stage1_options(opts, mip_rel_gap, max_nodes))
        info.update(s1info)
    times["stage1"] = time.perf_counter() - t0

    # ---- stage 2 ----
    with activity("plan: stage 2 (rows within clusters)"):
        t0 = time.perf_counter()
        jidx, s2info = _stage2(e, lab, Yint, path, opts, stage2)
        info.update(s2info)
    times["stage2"] = time.perf_counter() - t0

    # ---- repair ----
    with activity("plan: repair and compare"):
        t0 = time.perf_counter()
        jidx = _repair_and_pick(p, jidx, rounded, info)
    times["repair"] = time.perf_counter() - t0

    return _plan_from_choice(p, jidx, budget, scope, lower_bound, stage1_obj, times, info, G, t_start)


def _cluster_summary(p: _Problem, lab: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Per cluster of the labels ``lab [C]``: ``(G, Nk [G] channel counts, wk [G, K] the cost vector
    (clusters are partitioned by it, so one per cluster), gk [G] the budget group)``."""
    G = int(lab.max()) + 1
    Nk = np.bincount(lab, minlength=G)
    wk = np.zeros((G, p.cand.shape[0]), dtype=np.int64)
    wk[lab] = p.w  # one cost vector per cluster (clusters are partitioned by it)
    gk = np.zeros(G, dtype=np.int64)
    gk[lab] = p.group
    return G, Nk, wk, gk


def _cluster_error_range(e: np.ndarray, lab: np.ndarray, G: int) -> tuple[np.ndarray, np.ndarray]:
    """``(emax, emin)`` ``[G, K]``: the largest and smallest SSE ``e [C, K]`` of any channel of each
    cluster at each width (the costs of stage 1's slack columns ``s+`` and ``s-``)."""
    emax = np.full((G, e.shape[1]), -np.inf)
    emin = np.full((G, e.shape[1]), np.inf)
    np.maximum.at(emax, lab, e)
    np.minimum.at(emin, lab, e)
    return emax, emin


def _check_plan_options(clusters: int, stage2: str, samples: int | None, scope: str,
                        threads: int | None, max_nodes: int | None) -> int:
    """Refuse bad planner options (ValueError, in :func:`assign_precision`'s documented terms) and
    return ``samples`` with its scope-dependent default filled in (32 for the model scope, 8 for the
    matrix scope)."""
    if int(clusters) < 1:
        raise ValueError(f"clusters must be >= 1, got {clusters}")
    if stage2 not in ("combinatorial", "lp"):
        raise ValueError(f'stage2 must be "combinatorial" or "lp", got {stage2!r}')
    if samples is None:
        samples = 32 if scope == "model" else 8
    if int(samples) < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    if threads not in (None, 1):
        raise ValueError(f"threads={threads}: the precision plan runs HiGHS on one thread, so that the plan "
                         "does not depend on the thread count; leave threads unset (or 1)")
    if max_nodes is not None and int(max_nodes) < 1:
        raise ValueError(f"max_nodes must be >= 1 (or None: no node limit), got {max_nodes}")
    return samples


def _stage1_options(opts: dict[str, Any], mip_rel_gap: float | None, max_nodes: int | None) -> dict[str, Any]:
    """The HiGHS options of stage 1's branch and bound: ``opts`` plus its stopping rules (relative
    gap, node limit; no absolute gap) and a feasibility tolerance fit for counts up to ~1e4."""
    s1_opts = dict(opts)
    if mip_rel_gap is not None:
        s1_opts["mip_rel_gap"] = mip_rel_gap
    s1_opts["max_nodes"] = max_nodes if max_nodes is not None else 2**31 - 1
    # "optimal" means the relative gap: HiGHS' default absolute gap (1e-6) would also stop it, and the
    # objective (scaled by the largest sample cost) can be small enough that this stops it early.
    s1_opts.setdefault("mip_abs_gap", 0.0)
    # Counts reach 1e4 and come out of mu @ Y products carrying ~1e-5 of float noise: at
    # HiGHS' default 1e-6 an integral LP vertex looks fractional and the search runs on for
    # seconds to minutes.  1e-4 absolute is 1e-8 relative; rounding is checked exactly after.
    s1_opts.setdefault("mip_feasibility_tolerance", 1e-4)
    return s1_opts


def _repair_and_pick(p: _Problem, jidx: np.ndarray, rounded: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """Repair both plans (the two-stage one, ``jidx [C]``, and the LP rounding, ``rounded [C]``:
    candidate indices per channel) into the budget window and return the one of least SSE (the LP
    rounding only if it fills the budget or the two-stage plan does not either). Records the repair
    moves, both objectives, the source and whether the budget is filled in ``info``."""
    e = p.e
    jidx, moves, filled = _repair(p, jidx)
    info["repair_moves"] = moves
    rows = np.arange(e.shape[0])
    rounded, _, rounded_filled = _repair(p, rounded)
    two_stage_sse = float(e[rows, jidx].sum())
    rounded_sse = float(e[rows, rounded].sum())
    info["two_stage_objective"] = two_stage_sse
    info["lp_rounding_objective"] = rounded_sse
    info["plan_source"] = "two-stage"
    if rounded_sse < two_stage_sse and (rounded_filled or not filled):
        jidx, filled = rounded, rounded_filled
        info["plan_source"] = "lp rounding"
    info["budget_filled"] = filled
    return jidx


def _plan_from_choice(p: _Problem, jidx: np.ndarray, budget: float, scope: str, lower_bound: float,
                      stage1_obj: float, times: dict[str, float], info: dict[str, Any], G: int,
                      t_start: float) -> PrecisionPlan:
    """The :class:`PrecisionPlan` of the chosen candidate index per channel ``jidx [C]``: bits,
    SSE, average bits (and cost bits), the relative gap to ``lower_bound`` and the total time."""
    e, n, cand = p.e, p.n, p.cand
    C = e.shape[0]
    rows = np.arange(C)
    bits = cand[jidx].astype(np.int64)
    objective = float(e[rows, jidx].sum())
    used = int((n * bits).sum())
    average = used / int(n.sum())
    average_cost = (int(p.w[np.arange(C), jidx].sum()) / int(n.sum())
                    if p.given_costs else None)
    gap = (objective - lower_bound) / lower_bound if lower_bound > 0 else (
        0.0 if objective <= 0 else math.inf)
    if -1e-12 < gap < 0:  # summation round-off; a larger negative gap would be a bug: kept
        gap = 0.0
    times["total"] = time.perf_counter() - t_start
    return PrecisionPlan(
        bits=bits, candidates=tuple(int(c) for c in cand), budget=float(budget), scope=scope,
        average_bits=average, objective=objective, lower_bound=lower_bound, gap=gap,
        stage1_objective=stage1_obj, times=times, solver=_solver_name(), info=info,
        n_clusters=G, params=n, layer_sizes=p.layer_sizes,
        layer_index=p.layer_of if p.layer_sizes is None else None,
        average_cost_bits=average_cost)
