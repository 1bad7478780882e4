"""References and baselines (tests and benchmark): the exact flat ILP, the marginal-gain
greedy, and one uniform width."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from lowra.precision.highs import _solve
from lowra.precision.problem import _ArrayLike, _budget_fraction, _prepare, _to_numpy


def exact_assignment(
    errors: _ArrayLike,
    params: _ArrayLike,
    budget: float,
    candidates: Sequence[int] = (1, 2, 4),
    *,
    scope: str = "model",
    layer_sizes: Sequence[int] | None = None,
    layer_ids: _ArrayLike | None = None,
    time_limit: float | None = None,
    mip_rel_gap: float = 0.0,
    threads: int | None = None,
    verbose: bool = False,
    bit_costs: _ArrayLike | None = None,
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """The flat problem (same constraints as :func:`assign_precision`) as one binary ILP
    ``x [C, K]`` solved directly by HiGHS through CVXPY.  For small instances (a few thousand
    channels): the reference the two-stage plan is checked against.  ``bit_costs [C, K]``:
    as in :func:`assign_precision`.

    Returns ``(bits [C] int64, objective, info)``; ``info`` has the solver status, HiGHS'
    MIP gap and the solve time.
    """
    import cvxpy as cp

    p = _prepare(errors, params, budget, candidates, scope, layer_sizes, layer_ids, bit_costs)
    e, cand = p.e, p.cand
    C, K = e.shape
    unit = p.unit_abs  # divides every cost: exact small integer coefficients
    x = cp.Variable(C * K, boolean=True)
    R = sp.csr_matrix((np.ones(C * K), (np.repeat(np.arange(C), K), np.arange(C * K))),
                      shape=(C, C * K))
    W = sp.csr_matrix(((p.w // unit).ravel().astype(np.float64),
                       (np.repeat(p.group, K), np.arange(C * K))), shape=(p.cap.shape[0], C * K))
    sc = max(float(e.max()), 1e-300)
    prob = cp.Problem(cp.Minimize((e.ravel() / sc) @ x),
                      [R @ x == 1, W @ x <= np.floor_divide(p.cap, unit),
                       W @ x >= -np.floor_divide(-p.lo, unit)])
    t0 = time.perf_counter()
    _solve(prob, {"verbose": verbose, "time_limit": time_limit, "threads": threads,
                  "mip_rel_gap": mip_rel_gap})
    dt = time.perf_counter() - t0
    if x.value is None:
        raise RuntimeError(f"exact ILP failed: {prob.status}")
    jidx = np.asarray(x.value).reshape(C, K).argmax(1)
    stats = getattr(prob.solver_stats, "extra_stats", None)
    info = {"status": prob.status, "time": dt,
            "mip_gap": float(getattr(stats, "mip_gap", float("nan"))) if stats else float("nan")}
    return cand[jidx].astype(np.int64), float(e[np.arange(C), jidx].sum()), info


def greedy_assignment(
    errors: _ArrayLike,
    params: _ArrayLike,
    budget: float,
    candidates: Sequence[int] = (1, 2, 4),
    *,
    scope: str = "model",
    layer_sizes: Sequence[int] | None = None,
    layer_ids: _ArrayLike | None = None,
    bit_costs: _ArrayLike | None = None,
) -> np.ndarray:
    """Baseline: the marginal-gain greedy.  Start every channel at the narrowest width;
    repeatedly upgrade, to its *next* candidate, the channel with the largest error saved per
    added bit; a channel whose next step no longer fits (or does not help) stops there.

    Vectorized but equivalent to the heap version: a step's effective priority is the
    minimum efficiency of its channel's steps so far (the heap pops a better later step right
    after its predecessor); the prefix of steps that fits is taken at once, the last few that
    still fit one by one.  ``bit_costs [C, K]``: as in :func:`assign_precision` (the bits
    of a step are then its cost increase).  Returns ``bits [C]`` int64.
    """
    p = _prepare(errors, params, budget, candidates, scope, layer_sizes, layer_ids, bit_costs)
    e, cand = p.e, p.cand
    C, K = e.shape
    jidx = np.zeros(C, dtype=np.int64)
    if K == 1:
        return cand[jidx].astype(np.int64)
    dw = np.diff(p.w, axis=1)                                  # [C, K-1]
    gain = e[:, :-1] - e[:, 1:]
    prio = np.minimum.accumulate(gain / dw, axis=1)
    ch = np.repeat(np.arange(C), K - 1)
    st = np.tile(np.arange(K - 1), C)
    prio, dw = prio.ravel(), dw.ravel()
    ok = prio > 0
    grp = p.group[ch]
    order = np.lexsort((st[ok], ch[ok], -prio[ok], grp[ok]))
    sel = np.nonzero(ok)[0][order]
    G = p.cap.shape[0]
    starts = np.searchsorted(grp[sel], np.arange(G + 1))
    min_step = int(dw.min())  # no step fits below it
    for g in range(G):
        s = sel[starts[g]:starts[g + 1]]
        slack = int(p.cap[g]) - int(p.w[p.group == g, 0].sum())
        cw = np.cumsum(dw[s])
        t = int(np.searchsorted(cw, slack, side="right"))
        np.add.at(jidx, ch[s[:t]], 1)  # a prefix takes each channel's steps in order
        rem = slack - (int(cw[t - 1]) if t > 0 else 0)
        if t < s.shape[0]:
            blocked = np.zeros(C, dtype=bool)
            blocked[ch[s[t]]] = True
            rest = s[t + 1:]
            rest = rest[dw[rest] <= rem]
            for i in rest:
                if rem < min_step:
                    break
                c = ch[i]
                if blocked[c] or jidx[c] != st[i]:
                    continue
                if dw[i] <= rem:
                    jidx[c] += 1
                    rem -= int(dw[i])
                else:
                    blocked[c] = True
    return cand[jidx].astype(np.int64)


def uniform_assignment(params: _ArrayLike, budget: float,
                       candidates: Sequence[int] = (1, 2, 4)) -> np.ndarray | None:
    """Baseline: every channel at ``budget`` bits when the budget is one of the candidates
    (the QLoRA/LoftQ setting); ``None`` otherwise.  Returns ``bits [C]`` int64."""
    B = _budget_fraction(budget)
    if B.denominator != 1 or int(B) not in [int(c) for c in candidates]:
        return None
    return np.full(_to_numpy(params, "params").shape[0], int(B), dtype=np.int64)
