"""Convex-hull segments and the LP bound.

``PrecisionPlan.lower_bound`` is the LP relaxation of the flat problem, computed exactly by
the classic greedy on each channel's lower convex hull of ``(w[c, j], e[c, j])`` (Sinha &
Zoltners 1979): sort all hull segments by error saved per bit, take them until the budget is
used, the last one fractionally.  Its value equals the HiGHS LP optimum (checked in the tests).
An LP optimum has at most one fractional channel per budget row, so the integer optimum lies
within one channel's error step of the bound, and ``gap`` measures the true sub-optimality at
scale.  The hull segments are also the raw material of stage 1 and 2 (:mod:`lowra.precision.efficiency_paths`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lowra.precision.problem import _ArrayLike, _prepare, _Problem


@dataclasses.dataclass
class _Segments:
    """Upgrade steps along each channel's lower-left convex hull of ``(w[c, j], e[c, j])``
    (``w[c, j] = n_c * b_j`` without ``bit_costs``).

    Every channel starts at candidate 0.  Segment ``s`` moves channel ``ch[s]`` from candidate
    ``src[s]`` to ``dst[s]``, costs ``dw[s] = w[c, dst] - w[c, src]`` bits, saves
    ``de[s] > 0`` error, at efficiency ``r[s] = de / dw`` (strictly decreasing along a channel,
    so every efficiency-sorted prefix takes each channel's segments in order).  Candidates
    off the hull or beyond the minimum error are never on a segment: at any price they lose.
    Shapes: all ``[S]``, ``S <= C * (K - 1)``; ``ch`` int32, ``src``/``dst`` int8.
    """

    ch: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    dw: np.ndarray
    de: np.ndarray
    r: np.ndarray
    order_r: np.ndarray  # stable argsort of -r: keeps each channel's segments in order


def _hull_segments(e: np.ndarray, w: np.ndarray) -> _Segments:
    """Hull segments of ``e [C, K]`` over the costs ``w [C, K]`` (int64, increasing)."""
    C, K = e.shape
    x = w.astype(np.float64)
    on = np.ones((C, K), dtype=bool)
    if K > 1:
        runmin = np.minimum.accumulate(e, axis=1)
        on[:, 1:] = e[:, 1:] < runmin[:, :-1]  # strictly better than every narrower width
    for j in range(1, K - 1):  # strictly below every chord i < j < l (a lower-hull vertex)
        for i in range(j):
            for k in range(j + 1, K):
                # per row; for w = n * cand the correctly rounded quotient equals the
                # per-candidate (cand_j - cand_i) / (cand_k - cand_i) bit for bit
                t = (x[:, j] - x[:, i]) / (x[:, k] - x[:, i])
                on[:, j] &= e[:, j] < e[:, i] + t * (e[:, k] - e[:, i])
    prev = np.zeros(C, dtype=np.int8)
    last_r = np.full(C, np.inf)
    parts: list[tuple[np.ndarray, ...]] = []
    for j in range(1, K):
        ch = np.nonzero(on[:, j])[0].astype(np.int32)
        if ch.size == 0:
            continue
        src = prev[ch]
        dw = w[ch, j] - w[ch, src]
        de = e[ch, src] - e[ch, j]
        r = np.minimum(de / dw, last_r[ch])  # guard the strict order against float rounding
        parts.append((ch, src, np.full(ch.size, j, dtype=np.int8), dw, de, r))
        prev[ch] = j
        last_r[ch] = r
    if not parts:
        z = np.zeros(0, dtype=np.int64)
        return _Segments(z.astype(np.int32), z.astype(np.int8), z.astype(np.int8), z,
                         z.astype(np.float64), z.astype(np.float64), z)
    cols = [np.concatenate(p) for p in zip(*parts)]
    # Segments are laid out column by column, so a channel's earlier segment comes first;
    # a stable sort keeps that order among equal efficiencies.
    order_r = np.argsort(-cols[5], kind="stable")
    return _Segments(ch=cols[0], src=cols[1], dst=cols[2], dw=cols[3].astype(np.int64),
                     de=cols[4], r=cols[5], order_r=order_r)


def _stable_by(key: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``order`` re-sorted by the integer ``key`` of its entries, stable (ties keep order)."""
    k = key[order]
    if k.size and int(k.max()) < 2**15:
        k = k.astype(np.int16)  # numpy sorts 16-bit integers with a radix sort
    return order[np.argsort(k, kind="stable")]


def _group_lp_bounds(p: _Problem, seg: _Segments) -> tuple[np.ndarray, np.ndarray]:
    """Exact LP-relaxation optimum of the flat problem per budget group, ``[G]`` each: the
    value, and the price (error per bit) of the last, fractional, segment."""
    G = p.cap.shape[0]
    base_e = np.bincount(p.group, weights=p.e[:, 0], minlength=G)
    base_w = np.bincount(p.group, weights=p.w[:, 0], minlength=G)
    order = seg.order_r if G == 1 else _stable_by(p.group[seg.ch], seg.order_r)
    sg, dw, de, r = p.group[seg.ch[order]], seg.dw[order], seg.de[order], seg.r[order]
    starts = np.searchsorted(sg, np.arange(G + 1))
    out = np.empty(G)
    price = np.zeros(G)
    for g in range(G):
        a, b = starts[g], starts[g + 1]
        slack = float(p.cap[g]) - base_w[g]
        cw = np.cumsum(dw[a:b], dtype=np.float64)
        cde = np.cumsum(de[a:b])
        t = int(np.searchsorted(cw, slack, side="right"))  # fully taken segments
        val = base_e[g] - (cde[t - 1] if t > 0 else 0.0)
        if t < b - a:
            used = cw[t - 1] if t > 0 else 0.0
            val -= de[a + t] * (slack - used) / dw[a + t]
            price[g] = r[a + t]
        out[g] = val
    return out, price


def lp_lower_bound(errors: _ArrayLike, params: _ArrayLike, budget: float,
                   candidates: Sequence[int] = (1, 2, 4), *, scope: str = "model",
                   layer_sizes: Sequence[int] | None = None,
                   layer_ids: _ArrayLike | None = None,
                   bit_costs: _ArrayLike | None = None) -> float:
    """LP-relaxation optimum of the flat problem (a lower bound on any plan's total SSE).

    ``errors [C, K]``, ``params [C]``, optional ``bit_costs [C, K]`` (see
    :func:`assign_precision`).  Exact: greedy on the channels' lower convex hulls, the last
    segment taken fractionally (optimal for the LP of a multiple-choice knapsack).
    """
    p = _prepare(errors, params, budget, candidates, scope, layer_sizes, layer_ids, bit_costs)
    return float(_group_lp_bounds(p, _hull_segments(p.e, p.w))[0].sum())
