"""Stage 2: the exact assignment of channels within each cluster, given its counts.

2. **Stage 2 (transportation problem per cluster).**  Given ``y_k``, assign the cluster's
   channels: ``x[c, j] in {0, 1}``, ``sum_j x[c, j] = 1``, ``sum_c x[c, j] = y[k, j]``.  Its
   constraint matrix is totally unimodular, so every vertex of the LP is integral.  It is
   solved exactly, without one solver start-up per cluster:

   * one width used: trivial;
   * ``y_k`` equals the counts of a prefix of the cluster's efficiency path: that prefix is
     optimal (Lagrangian sufficiency: every channel of it minimizes ``e + lam * w`` at the
     price ``lam`` of the last upgrade taken, so no assignment with the same bit total, hence
     none with the same counts, has a lower error; the cluster's channels share one cost
     vector, so equal counts mean equal bit totals).  This covers every cluster that stage 1
     puts on a sample point;
   * two widths ``a < b`` used: give ``b`` to the ``y[k, b]`` channels with the smallest
     ``e[c, b] - e[c, a]`` (exchange argument; exact);
   * otherwise (three or more widths): successive shortest paths, started from the prefix (or
     pure point) nearest the counts, which is optimal for its own counts; each augmentation
     moves one channel-unit along a shortest path of the K-node exchange graph (the residual
     network with channel nodes contracted), so every step stays optimal (the textbook
     min-cost-flow argument; ``_ssp``).  Alternative ``stage2="lp"``: all such clusters in
     **one** block-diagonal LP through CVXPY, solved by HiGHS' simplex, whose basic optimum is
     integral by total unimodularity (slower: HiGHS needs ~1 min for one 8k-channel cluster).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from lowra.precision.efficiency_paths import _ClusterPaths
from lowra.precision.highs import _solve


def _stage2(e: np.ndarray, lab: np.ndarray, Y: np.ndarray, path: _ClusterPaths,
            opts: dict[str, Any], method: str = "combinatorial"
            ) -> tuple[np.ndarray, dict[str, Any]]:
    """Exact per-cluster transportation given counts ``Y [G, K]``; returns candidate index
    ``[C]`` per channel and counters of the method used per cluster.  Clusters with three or
    more widths in use go to successive shortest paths (``method="combinatorial"``) or all
    into one block-diagonal LP (``method="lp"``)."""
    import cvxpy as cp

    C, K = e.shape
    G = Y.shape[0]
    jidx = np.zeros(C, dtype=np.int64)
    corder = np.argsort(lab, kind="stable")
    cstart = np.searchsorted(lab[corder], np.arange(G + 1))
    prefix_m = np.full(G, -1, dtype=np.int64)
    lp_clusters: list[int] = []
    n_pure = n_prefix = n_two = n_ssp = 0
    Nk = np.diff(cstart)
    ones_k = np.nonzero(Y == Nk[:, None])
    pure = np.full(G, -1)
    pure[ones_k[0]] = ones_k[1]
    for k in range(G):
        chs = corder[cstart[k]:cstart[k + 1]]
        if pure[k] >= 0:
            jidx[chs] = pure[k]
            n_pure += 1
            continue
        m = _match_prefix(path, k, Y[k], Nk[k])
        if m >= 0:
            prefix_m[k] = m
            n_prefix += 1
            continue
        active = np.nonzero(Y[k])[0]
        if active.shape[0] == 2:
            a, b = int(active[0]), int(active[1])
            d = e[chs, b] - e[chs, a]
            pick = np.argsort(d, kind="stable")[:Y[k, b]]
            jidx[chs] = a
            jidx[chs[pick]] = b
            n_two += 1
            continue
        if method == "lp":
            lp_clusters.append(k)
            continue
        start = _closest_start(path, k, Y[k], Nk[k], chs)
        jidx[chs] = _ssp(e[chs], start, Y[k])
        n_ssp += 1
    if n_prefix:
        sel = prefix_m[path.cl] > path.rank  # segments inside the chosen prefixes
        has = prefix_m >= 0
        jidx[np.isin(lab, np.nonzero(has)[0])] = 0
        np.maximum.at(jidx, path.ch[sel], path.dst[sel])
    lp_status = None
    if lp_clusters:
        chs_list = [corder[cstart[k]:cstart[k + 1]] for k in lp_clusters]
        chs = np.concatenate(chs_list)
        M = chs.shape[0]
        local = np.repeat(np.arange(len(lp_clusters)), [c.shape[0] for c in chs_list])
        x = cp.Variable(M * K, nonneg=True)
        R = sp.csr_matrix((np.ones(M * K), (np.repeat(np.arange(M), K), np.arange(M * K))),
                          shape=(M, M * K))
        Cm = sp.csr_matrix((np.ones(M * K), ((local[:, None] * K + np.arange(K)).ravel(),
                                             np.arange(M * K))), shape=(len(lp_clusters) * K,
                                                                        M * K))
        cost = e[chs].ravel()
        sc = max(float(cost.max()), 1e-300)
        prob = cp.Problem(cp.Minimize((cost / sc) @ x),
                          [R @ x == 1, Cm @ x == Y[lp_clusters].ravel().astype(np.float64)])
        _solve(prob, opts, highs={"solver": "simplex"})
        if x.value is None:
            raise RuntimeError(f"stage-2 LP failed: {prob.status}")
        X = np.asarray(x.value).reshape(M, K)
        if np.abs(X - np.rint(X)).max() > 1e-6:  # a simplex vertex of a TU system is integral
            raise RuntimeError("stage-2 LP returned a fractional point (not a simplex vertex: "
                               "keep HiGHS' simplex / crossover on)")
        jidx[chs] = X.argmax(1)
        got = np.zeros((len(lp_clusters), K), dtype=np.int64)
        np.add.at(got, (local, jidx[chs]), 1)
        if not np.array_equal(got, Y[lp_clusters]):
            raise RuntimeError("stage-2 LP solution does not meet the stage-1 counts")
        lp_status = prob.status
    return jidx, {"stage2_pure": n_pure, "stage2_prefix": n_prefix, "stage2_two_width": n_two,
                  "stage2_shortest_paths": n_ssp, "stage2_lp_clusters": len(lp_clusters),
                  "stage2_lp_status": lp_status}


def _closest_start(path: _ClusterPaths, k: int, yk: np.ndarray, Nk: int,
                   chs: np.ndarray) -> np.ndarray:
    """Candidate index ``[N_k]`` (channels ``chs``) of the path prefix or pure assignment of
    cluster ``k`` whose counts are nearest ``yk`` in L1: optimal for its own counts, so a
    valid start for successive shortest paths, and few augmentations away."""
    K = yk.shape[0]
    a, b = path.start[k], path.start[k + 1]
    cnt = np.zeros((b - a + 1, K), dtype=np.int64)
    cnt[:, 0] = Nk
    cnt[1:] += path.cum_cnt[a:b]
    dist = np.abs(cnt - yk).sum(1)
    m = int(dist.argmin())
    pure = int(np.argmax(yk))
    pure_dist = 2 * (Nk - int(yk[pure]))  # L1 distance of "all at the most used width"
    if pure_dist < dist[m]:
        return np.full(chs.shape[0], pure, dtype=np.int64)
    out = np.zeros(chs.shape[0], dtype=np.int64)
    if m:
        pos = np.searchsorted(chs, path.ch[a:a + m])  # chs is sorted (stable argsort)
        np.maximum.at(out, pos, path.dst[a:a + m])
    return out


def _ssp(ek: np.ndarray, start: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Successive shortest paths for one cluster: from ``start [N]`` (an assignment optimal
    for its own counts) to counts ``target [K]``, moving one channel-unit at a time along a
    shortest path of the K-node exchange graph, edge ``a -> b`` weighing
    ``min_{c at a} (ek[c, b] - ek[c, a])``.  That graph is the residual network of the
    transportation problem with each channel node contracted (a path alternates width,
    channel, width; a simple path uses distinct channels), so this is the textbook SSP
    algorithm for min-cost flow and every intermediate assignment is optimal for its counts.
    ``ek [N, K]``; O(N K^2) per augmentation, |target - counts(start)|_1 / 2 augmentations."""
    K = ek.shape[1]
    j = start.copy()
    cnt = np.bincount(j, minlength=K)
    arange_k = np.arange(K)
    while True:
        excess = cnt - target
        if not excess.any():
            return j
        w = np.full((K, K), np.inf)
        arg = np.zeros((K, K), dtype=np.int64)
        for a in range(K):
            idx = np.nonzero(j == a)[0]
            if idx.size == 0:
                continue
            d = ek[idx] - ek[idx, a][:, None]
            am = d.argmin(0)
            w[a] = d[am, arange_k]
            arg[a] = idx[am]
            w[a, a] = np.inf
        dist = np.where(excess > 0, 0.0, np.inf)
        pred = np.full(K, -1)
        for _ in range(K - 1):  # Bellman-Ford from every width with excess
            cand = dist[:, None] + w
            src = cand.argmin(0)
            best = cand[src, arange_k]
            better = best < dist
            if not better.any():
                break
            dist[better] = best[better]
            pred[better] = src[better]
        sinks = np.nonzero(excess < 0)[0]
        b = int(sinks[np.argmin(dist[sinks])])
        if not np.isfinite(dist[b]):  # pragma: no cover - counts always reachable
            raise RuntimeError("stage 2: target counts unreachable")
        moves = []  # trace back to the width with excess the path starts from
        v = b
        for _ in range(K):
            u = pred[v]
            if u < 0:
                break
            moves.append((arg[u, v], v))
            v = u
        for c, to in moves:
            j[c] = to
        cnt = np.bincount(j, minlength=K)


def _match_prefix(path: _ClusterPaths, k: int, yk: np.ndarray, Nk: int) -> int:
    """Length of the prefix of cluster ``k``'s path whose counts equal ``yk``, or -1."""
    a, b = path.start[k], path.start[k + 1]
    if b == a:
        return -1
    # bit total above the all-narrowest start, strictly increasing along the path
    target = int((yk * path.gap0[k]).sum())
    if target == 0:
        return 0 if yk[0] == Nk else -1
    i = int(np.searchsorted(path.cum_db[a:b], target))
    if i >= b - a or path.cum_db[a + i] != target:
        return -1
    cnt = path.cum_cnt[a + i].astype(np.int64).copy()
    cnt[0] += Nk
    return i + 1 if np.array_equal(cnt, yk) else -1
