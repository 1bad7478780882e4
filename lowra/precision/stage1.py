"""Stages 0 and 1: clusters (k-means) and the integer program over clusters.

0. **Clusters.**  Channels are partitioned by parameter count (with ``bit_costs``: by cost
   vector ``w[c, :]``, so keep the distinct cost vectors few, e.g. one per matrix shape);
   each partition is clustered by k-means (k-means++ seeding with a fixed seed, Lloyd on a
   seeded 64k subsample, then every channel to its nearest center) on the features
   ``log(e[c, j] / n_c)``.  With per-matrix budgets the clusters are then split by matrix.
   All channels of a cluster have the same ``n_c`` (or cost vector) and budget, so the budget
   only depends on *how many* channels of a cluster take each width.
1. **Stage 1 (integer program over clusters).**  Integer ``y[k, j]`` = number of channels of
   cluster ``k`` at candidate ``j``; ``sum_j y[k, j] = N_k``; the budget rows of the flat problem
   (:mod:`lowra.precision`).  The exact cost of counts ``y_k`` is ``f_k(y_k)``, the optimum of
   the stage-2 problem; ``f_k`` is convex (the value of an LP as a function of its right-hand
   side).  Stage 1 models ``f_k`` from
   inside by exact sums at sampled count vectors: ``y_k = sum_p mu[k, p] Y[k, p]``,
   ``sum_p mu[k, p] = 1``, ``mu >= 0``, cost ``sum_p mu[k, p] F[k, p]`` with
   ``F[k, p] = f_k(Y[k, p])`` exactly.  By convexity the modelled cost is an upper bound of
   ``f_k`` that is exact at the samples, so stage 2 can only do better than stage 1 predicts.
   The samples are the K *pure* points (all channels of the cluster at one width) plus
   ``samples + 1`` points along the cluster's own efficiency path
   (:mod:`lowra.precision.efficiency_paths`): the assignments reached by upgrading channels in decreasing
   order of error saved per bit.
   With ``samples=0`` only the pure points remain and the cost is exactly the paper's
   "cluster mean error x count" (a linear cost is the convex combination of pure points).
   Mean costs force whole clusters to one width (only a couple of clusters are split), which
   costs ~0.05 % of SSE over the LP bound at Llama-2-7B scale; the sampled path cuts that to
   ~0.001 % for a few thousand extra continuous variables (Decision: ``samples=32``, 8 per
   matrix; ``results/bench/precision_cpu.json``).  The pure points keep every count vector
   feasible, so stage 1 and the flat problem have the same feasible budget totals.  Integer
   counts between samples are reached by priced slack moves (see ``_stage1``), and the fill
   row is added only when the optimum without it misses it.  With ``bit_costs`` each budget
   group (matrix) is its own program (``_stage1`` says why).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from lowra.precision.highs import MipResult, solve_mip
from lowra.precision.problem import _Problem


# --------------------------------------------------------------------------------------------
# k-means (numpy, deterministic)
# --------------------------------------------------------------------------------------------
def _nearest(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index ``[N]`` of the nearest of ``centers [k, d]`` for every row of ``X [N, d]``
    (a KD-tree over the centers: exact, ~5x faster than a distance matrix for small d)."""
    from scipy.spatial import cKDTree

    workers = -1 if X.shape[0] >= 200_000 else 1  # threads only pay off on big queries
    return cKDTree(centers).query(X, k=1, workers=workers)[1].astype(np.int64)


def _kmeans(X: np.ndarray, k: int, rng: np.random.Generator, iters: int,
            sample: int) -> np.ndarray:
    """Labels ``[N]`` in ``[0, k')`` (``k' <= k``, no empty cluster) of Lloyd's k-means on
    ``X [N, d]`` with k-means++ seeding.  Fitted on a seeded random subsample of ``sample``
    rows, then every row is assigned to its nearest center: in 3-4 dimensions 64k points
    (500 per cluster) place 128 centers as well as 1.2M do, 20x cheaper.  Lloyd stops when no
    sample changes cluster or after ``iters`` rounds.  Deterministic for a given ``rng``."""
    N = X.shape[0]
    if N <= k:
        return np.arange(N)
    S = X[np.sort(rng.choice(N, sample, replace=False))] if N > sample else X
    # k-means++ seeding: each next center drawn with probability ~ squared distance
    centers = [S[int(rng.integers(S.shape[0]))]]
    d2 = ((S - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        tot = d2.sum()
        if not tot > 0:
            break  # fewer distinct points than clusters
        i = int(np.searchsorted(np.cumsum(d2), rng.random() * tot, side="right"))
        centers.append(S[min(i, S.shape[0] - 1)])
        d2 = np.minimum(d2, ((S - centers[-1]) ** 2).sum(1))
    C = np.array(centers)
    lab = None
    for _ in range(iters):
        new = _nearest(S, C)
        if lab is not None and np.array_equal(new, lab):
            break
        lab = new
        cnt = np.bincount(lab, minlength=C.shape[0])
        sums = np.stack([np.bincount(lab, weights=S[:, j], minlength=C.shape[0])
                         for j in range(S.shape[1])], 1)
        nz = cnt > 0
        C[nz] = sums[nz] / cnt[nz, None]  # an empty cluster keeps its center
    lab = _nearest(X, C)
    used = np.bincount(lab, minlength=C.shape[0]) > 0
    return (np.cumsum(used) - 1)[lab]  # drop empty clusters


def _cluster(p: _Problem, clusters: int, seed: int, iters: int, sample: int) -> np.ndarray:
    """Cluster id ``[C]`` of every channel, ids ``0..G-1``.

    Partitions: equal ``n_c`` (with ``bit_costs``: equal cost vectors ``w[c, :]``, so every
    cluster has one cost vector); k-means (``clusters`` per partition) on ``log(e / n_c)``.
    With per-matrix budgets a stage-1 cluster must lie in one budget group, so the k-means
    clusters are then split by matrix (one k-means over all matrices: the same channel types
    get the same clusters everywhere, and one fit instead of hundreds of small ones).
    """
    C = p.e.shape[0]
    if p.costed:  # unique rows of w, in lexicographic order (as np.unique(axis=0), faster)
        keys = np.lexsort(p.w.T[::-1])
        ws = p.w[keys]
        new = np.ones(C, dtype=bool)
        new[1:] = (ws[1:] != ws[:-1]).any(1)
        part = np.empty(C, dtype=np.int64)
        part[keys] = np.cumsum(new) - 1
    else:
        _, part = np.unique(p.n, return_inverse=True)
    part = part.reshape(-1)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(part.max() + 2))
    feat = np.log(np.maximum(p.e / p.n[:, None], 1e-300))
    lab = np.empty(C, dtype=np.int64)
    offset = 0
    for q in range(part.max() + 1):
        idx = order[bounds[q]:bounds[q + 1]]
        rng = np.random.default_rng([seed, q])
        sub = _kmeans(feat[idx], clusters, rng, iters, sample)
        lab[idx] = sub + offset
        offset += int(sub.max()) + 1
    if p.cap.shape[0] > 1:  # split by budget group
        _, lab = np.unique(p.group * offset + lab, return_inverse=True)
        lab = lab.reshape(-1)
    return lab


def _stage1(p: _Problem, Y: np.ndarray, F: np.ndarray, pk: np.ndarray, Nk: np.ndarray,
            wk: np.ndarray, gk: np.ndarray, emax: np.ndarray, emin: np.ndarray,
            opts: dict[str, Any]) -> tuple[np.ndarray, float, dict[str, Any]]:
    """Stage-1 integer program over clusters (CVXPY model, HiGHS MIP).

    Sample points ``Y [P, K]`` (counts), ``F [P]`` (exact SSE), ``pk [P]`` (cluster); per
    cluster ``Nk``, ``wk [G, K]`` (bit cost of one channel at each width), ``gk`` (budget
    group), ``emax``/``emin [G, K]`` (largest / smallest error of its channels at each
    width).  Variables
    ``mu [P] >= 0`` and integer counts ``y [G, K]`` (as ``z = y[:, 1:]``, the narrowest width
    taking the rest); rows: ``sum mu = 1`` per cluster, ``y = sum mu Y``, the budget.  The
    budget rows are written in units of ``u`` bits above the all-narrowest plan (``u =
    gcd(n)``; with ``bit_costs`` the gcd of all cost increments ``w[c, j] - w[c, 0]``), so
    coefficients and right-hand sides are exact small integers, all ``>= 0`` in ``z``.

    Integer counts off the sampled chords are reached through per-cluster slack moves
    ``y = sum mu Y + s_plus - s_minus`` (``s >= 0``, ``sum_j y[k, j] = N_k`` so every unit
    of ``s_minus`` pairs with one of ``s_plus``) priced so that the model stays an upper bound
    of the true cost: moving any channel of cluster ``k`` from width ``a`` to ``b`` changes
    its error by at most ``max_c e[c, b] - min_c e[c, a]``.  Without
    them an integer point needs an exact convex combination of sample points, which HiGHS'
    rounding heuristics find slowly (seconds to minutes); with them rounding is immediate,
    and the optimum uses them for only the odd channel of a split cluster.

    The fill row (``budget - max n`` at least used) is a knapsack *equality window* that
    makes HiGHS' rounding heuristics slow, while an optimal plan of decreasing errors uses the
    budget anyway.  So the program is solved without it first; only when that solution misses
    the window is it solved again with the row (same optimum when the first one meets it,
    since it is then feasible for the tighter program).

    Budget groups share nothing, so with per-matrix budgets whole groups are batched into
    programs of at most ``_STAGE1_MAX_POINTS`` sample points (one program for the model
    scope).  With ``bit_costs`` every group gets its own program: a matrix's budget row then
    has coefficients like 15 and 48 (instead of 1 and 3), its integer optimum lies ~1e-3
    above its LP value on small matrices, and in one program HiGHS' branch-and-bound must
    close those gaps jointly to ``mip_rel_gap`` (measured on 7 matrices of 192 rows: 67-300 s
    batched, 10-16 s one program per matrix).  Returns counts ``[G, K]``, the modelled SSE
    and solver info.
    """
    G, K = Nk.shape[0], p.cand.shape[0]
    ngrp = p.cap.shape[0]
    base = np.zeros(ngrp, dtype=np.int64)
    np.add.at(base, p.group, p.w[:, 0])  # exact (bincount would sum in float64)
    unit = p.unit_inc
    dwk = (wk[:, 1:] - wk[:, :1]) // unit  # [G, K-1] budget coefficients, exact
    cap_u = np.floor_divide(p.cap - base, unit)   # sum n b <= cap  <=>  ... <= floor
    lo_u = -np.floor_divide(-(p.lo - base), unit)  # and >= lo  <=>  ... >= ceil
    # Budget groups are independent; batch them into programs of bounded size.
    pts_per_group = np.bincount(gk[pk], minlength=ngrp)
    limit = 0 if p.costed else _STAGE1_MAX_POINTS  # costed: one group per program
    batches: list[np.ndarray] = []
    cur: list[int] = []
    acc = 0
    for g in range(ngrp):
        if cur and acc + pts_per_group[g] > limit:
            batches.append(np.asarray(cur))
            cur, acc = [], 0
        cur.append(g)
        acc += int(pts_per_group[g])
    batches.append(np.asarray(cur))
    Yint = np.zeros((G, K), dtype=np.int64)
    total = 0.0
    infos = []
    for gs in batches:
        in_g = np.zeros(ngrp, dtype=bool)
        in_g[gs] = True
        ks = np.nonzero(in_g[gk])[0]
        pm = in_g[gk[pk]]
        kloc = np.full(G, -1)
        kloc[ks] = np.arange(ks.shape[0])
        gloc = np.full(ngrp, -1)
        gloc[gs] = np.arange(gs.shape[0])
        Yb, val, inf = _stage1_program(
            Y[pm], F[pm], kloc[pk[pm]], Nk[ks], dwk[ks], gloc[gk[ks]], cap_u[gs],
            lo_u[gs], p.cand, emax[ks], emin[ks], opts)
        Yint[ks] = Yb
        total += val
        infos.append(inf)
    info: dict[str, Any] = {"stage1_points": int(F.shape[0]), "stage1_programs": len(batches)}
    info["stage1_status"] = ",".join(sorted({i["status"] for i in infos}))
    fills = [i["fill_row"] for i in infos]
    info["stage1_fill_row"] = ("unreachable: repair" if "unreachable: repair" in fills else
                               "enforced" if "enforced" in fills else "not needed")
    gaps = [i["mip_gap"] for i in infos if "mip_gap" in i]
    if gaps:
        info["stage1_mip_gap"] = float(max(gaps))
    info["stage1_nodes"] = int(sum(i.get("nodes", 0) for i in infos))
    return Yint, total, info


_STAGE1_MAX_POINTS = 10_000  # per program (matrix scope): ~1 s of HiGHS each


def _stage1_program(Y: np.ndarray, F: np.ndarray, pk: np.ndarray, Nk: np.ndarray,
                    dwk: np.ndarray, gk: np.ndarray, cap_u: np.ndarray, lo_u: np.ndarray,
                    cand: np.ndarray, emax: np.ndarray, emin: np.ndarray,
                    opts: dict[str, Any]) -> tuple[np.ndarray, float, dict[str, Any]]:
    """One stage-1 program over a set of whole budget groups (local indices): clusters
    ``Nk``, ``dwk [G, K-1]`` (cost of one channel at width ``j >= 1`` above the narrowest, in
    units ``u``), ``gk``; budget rows ``lo_u <= . <= cap_u`` per group.
    Returns counts ``[G, K]``, the modelled SSE and the solver status.

    Columns ``[mu (P), s_plus (G K), s_minus (G K), z (G (K-1))]``, solved by :func:`solve_mip`
    (HiGHS on one thread, a node limit, no clock) from a MIP start: the LP relaxation's counts
    rounded down (always feasible: every budget coefficient is ``>= 0`` in ``z``) and completed by the
    LP over ``mu, s`` at those counts, so branch and bound starts from a plan within one channel
    per fractional cluster of the LP optimum.
    """
    G, K = Nk.shape[0], cand.shape[0]
    ngrp = cap_u.shape[0]
    npts = F.shape[0]
    scale = max(float(F.max()), 1e-300)
    nz = G * (K - 1)
    GK = G * K
    ncol = npts + 2 * GK + nz
    A, row_lo, row_hi, W = _stage1_rows(Y, pk, Nk, dwk, gk, cap_u, K)
    c = np.concatenate([F / scale, emax.ravel() / scale, -emin.ravel() / scale, np.zeros(nz)])
    col_lo = np.zeros(ncol)
    col_hi = np.concatenate([np.full(npts + 2 * GK, np.inf), np.repeat(Nk, K - 1).astype(np.float64)])
    integer = np.zeros(ncol, dtype=bool)
    integer[npts + 2 * GK:] = True
    zs = slice(npts + 2 * GK, ncol)
    lp_opts = {k: v for k, v in opts.items() if k in ("verbose", "threads")}

    def solve(with_fill: bool) -> MipResult:
        lo = row_lo.copy()
        if with_fill:
            lo[-ngrp:] = lo_u
        start = None
        if nz:
            relaxed = solve_mip(c, A, lo, row_hi, col_lo, col_hi, np.zeros(ncol, dtype=bool), lp_opts)
            if relaxed.x is not None:  # the LP's counts rounded down, mu and s re-solved at them
                z0 = np.floor(relaxed.x[zs] + 1e-6)
                fixed_lo, fixed_hi = col_lo.copy(), col_hi.copy()
                fixed_lo[zs] = fixed_hi[zs] = z0
                done = solve_mip(c, A, lo, row_hi, fixed_lo, fixed_hi, np.zeros(ncol, dtype=bool), lp_opts)
                start = done.x
        return solve_mip(c, A, lo, row_hi, col_lo, col_hi, integer, opts, start=start)

    def counts(r: MipResult) -> np.ndarray | None:
        if r.x is None:
            return None
        if K == 1:
            return np.asarray(Nk, dtype=np.float64)[:, None]
        zv = r.x[zs].reshape(G, K - 1)
        return np.concatenate([(Nk - zv.sum(1))[:, None], zv], 1)

    res = solve(False)
    info: dict[str, Any] = {"fill_row": "not needed"}
    Yf = counts(res)
    if Yf is not None and K > 1:
        used = W @ np.rint(Yf[:, 1:]).ravel()
        if not (used >= lo_u - 1e-6).all():
            res = solve(True)
            info["fill_row"] = "enforced"
            Yf = counts(res)
            if Yf is None:  # the window is unreachable for the solver: repair fills it
                res = solve(False)
                info["fill_row"] = "unreachable: repair"
                Yf = counts(res)
    if Yf is None:
        raise RuntimeError(f"stage-1 integer program failed: {res.status}")
    info.update(status=res.status, mip_gap=res.mip_gap, nodes=res.nodes, lp_iterations=res.lp_iterations)
    return _round_counts(Yf, Nk), float(res.objective) * scale, info


def _stage1_rows(Y: np.ndarray, pk: np.ndarray, Nk: np.ndarray, dwk: np.ndarray, gk: np.ndarray,
                 cap_u: np.ndarray, K: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, sp.csr_matrix]:
    """The constraint rows of the stage-1 program (columns as in :func:`_stage1_program`).

    Rows: ``sum mu = 1`` per cluster ``[G]`` | counts ``A_cnt mu + s+ - s- - T z = offset``
    ``[G K]`` (``Y [P, K]`` the points' counts, ``pk [P]`` their cluster; ``offset`` puts ``N_k`` at
    the narrowest width, ``T`` moves a channel from it to width ``j``) | ``S z <= N_k`` ``[G]`` |
    budget ``W z <= cap_u`` ``[ngrp]`` (``W`` from ``dwk [G, K-1]`` and the clusters' groups ``gk``).
    Returns ``(A, row_lo, row_hi, W)``: the budget rows' lower bound is ``-inf`` here (the fill row
    ``lo_u`` is set by the caller when needed), and ``W`` is returned to measure a plan's use.
    """
    G = Nk.shape[0]
    ngrp = cap_u.shape[0]
    npts = pk.shape[0]
    nz = G * (K - 1)
    GK = G * K
    A_sum = sp.csr_matrix((np.ones(npts), (pk, np.arange(npts))), shape=(G, npts))
    rows = (pk[:, None] * K + np.arange(K)[None, :]).ravel()
    cols = np.repeat(np.arange(npts), K)
    A_cnt = sp.csr_matrix((Y.ravel().astype(np.float64), (rows, cols)), shape=(GK, npts))
    eye = sp.identity(GK, format="csr")
    offset = np.zeros(GK)
    offset[np.arange(G) * K] = Nk
    kk = np.repeat(np.arange(G), K - 1)
    jj = np.tile(np.arange(1, K), G)
    T = sp.csr_matrix((np.concatenate([np.ones(kk.size), -np.ones(kk.size)]),
                       (np.concatenate([kk * K + jj, kk * K]), np.concatenate([np.arange(kk.size)] * 2))),
                      shape=(GK, nz))
    S = sp.csr_matrix((np.ones(kk.size), (kk, np.arange(kk.size))), shape=(G, nz))
    W = sp.csr_matrix((dwk.ravel().astype(np.float64), (np.repeat(gk, K - 1), np.arange(kk.size))),
                      shape=(ngrp, nz))
    # rows: sum mu = 1 | counts: A_cnt mu + s+ - s- - T z = offset | S z <= N | budget
    A = sp.vstack([
        sp.hstack([A_sum, sp.csr_matrix((G, 2 * GK + nz))]),
        sp.hstack([A_cnt, eye, -eye, -T]),
        sp.hstack([sp.csr_matrix((G, npts + 2 * GK)), S]),
        sp.hstack([sp.csr_matrix((ngrp, npts + 2 * GK)), W]),
    ], format="csr")
    row_lo = np.concatenate([np.ones(G), offset, np.full(G, -np.inf), np.full(ngrp, -np.inf)])
    row_hi = np.concatenate([np.ones(G), offset, Nk.astype(np.float64), cap_u.astype(np.float64)])
    return A, row_lo, row_hi, W


def _round_counts(Yf: np.ndarray, Nk: np.ndarray) -> np.ndarray:
    """Integer counts ``[G, K]`` from the solver's floats, each row summing to ``N_k``."""
    Y = np.rint(Yf).astype(np.int64)
    Y = np.maximum(Y, 0)
    diff = Nk - Y.sum(1)
    for k in np.nonzero(diff)[0]:  # only after solver round-off; tiny
        j = int(np.argmax(Y[k])) if diff[k] < 0 else int(np.argmax(Yf[k]))
        Y[k, j] += diff[k]
        if Y[k, j] < 0:  # spread a large negative correction
            rest = -Y[k, j]
            Y[k, j] = 0
            for jj in np.argsort(-Y[k]):
                take = min(rest, Y[k, jj])
                Y[k, jj] -= take
                rest -= take
    return Y
