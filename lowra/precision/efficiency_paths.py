"""Every cluster's efficiency path (its channels' hull segments by decreasing error saved per
bit): the sample points of stage 1's cost model and the prefixes stage 2 recognises as optimal.
"""

from __future__ import annotations

import numpy as np

from lowra.precision.bounds import _Segments, _stable_by


class _ClusterPaths:
    """Every cluster's efficiency path: its channels' hull segments sorted by decreasing
    error saved per bit (ties: channel, then the channel's own order).  A prefix of ``m``
    segments is a threshold assignment, optimal for its own counts (:mod:`lowra.precision.stage2`).

    Arrays over sorted segments ``[S]``: ``cl`` cluster, ``rank`` position in its cluster,
    ``ch``/``dst`` channel and target candidate, ``cum_de`` error saved, ``cum_db`` bits
    added (cost increments ``dw``), ``cum_cnt [S, K]`` count change, all cumulative and
    restarting at each cluster; ``start [G + 1]`` cluster offsets.  ``gap0 [G, K]``: each
    cluster's cost of one channel at each width above the narrowest, ``wk - wk[:, :1]``
    (``wk [G, K]`` its channels' common cost vector).
    """

    def __init__(self, seg: _Segments, lab: np.ndarray, wk: np.ndarray) -> None:
        G, K = wk.shape
        order = _stable_by(lab[seg.ch], seg.order_r)
        cl = lab[seg.ch]
        self.K = K
        self.gap0 = (wk - wk[:, :1]).astype(np.int64)
        self.cl = cl[order]
        self.ch = seg.ch[order]
        src = seg.src[order]
        self.dst = seg.dst[order]
        self.start = np.searchsorted(self.cl, np.arange(G + 1))
        self.rank = np.arange(self.cl.shape[0]) - self.start[self.cl]
        self.cum_de = _segmented_cumsum(seg.de[order], self.cl, self.start)
        self.cum_db = _segmented_cumsum(seg.dw[order].astype(np.int64), self.cl, self.start)
        delta = np.zeros((self.cl.shape[0], K), dtype=np.int32)
        idx = np.arange(self.cl.shape[0])
        delta[idx, src] -= 1
        delta[idx, self.dst] += 1
        self.cum_cnt = _segmented_cumsum(delta, self.cl, self.start)  # int32: |.| <= C

    def sample_points(self, Nk: np.ndarray, samples: int, e: np.ndarray,
                      lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stage-1 sample points: counts ``Y [P, K]``, exact costs ``F [P]``, cluster ``[P]``.

        Per cluster: the K pure points, and ``samples + 1`` prefixes of its path evenly
        spaced in segment count (prefix 0 = everything at the narrowest width).
        """
        G, K = Nk.shape[0], self.K
        pure_cost = np.stack([np.bincount(lab, weights=e[:, j], minlength=G)
                              for j in range(K)], 1)  # [G, K]
        Yp = (Nk[:, None, None] * np.eye(K, dtype=np.int64)[None]).reshape(G * K, K)
        Fp = pure_cost.reshape(-1)
        kp = np.repeat(np.arange(G), K)
        if samples == 0:
            return Yp, Fp, kp
        L = np.diff(self.start)
        m = np.rint(np.arange(samples + 1)[None, :] * L[:, None] / samples).astype(np.int64)
        kk = np.repeat(np.arange(G), samples + 1)
        m = m.ravel()
        keep = m > 0  # prefix 0 is the pure narrowest point
        pairs = np.unique(np.stack([kk[keep], m[keep]], 1), axis=0)
        kk, m = pairs[:, 0], pairs[:, 1]
        pos = self.start[kk] + m - 1
        Ys = np.zeros((kk.shape[0], K), dtype=np.int64)
        Ys[:, 0] = Nk[kk]
        Ys += self.cum_cnt[pos]
        Fs = pure_cost[kk, 0] - self.cum_de[pos]
        return (np.concatenate([Yp, Ys]), np.concatenate([Fp, Fs]),
                np.concatenate([kp, kk]))


def _segmented_cumsum(x: np.ndarray, seg_id: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Cumulative sum of ``x [S, ...]`` along axis 0, restarting at every segment;
    ``seg_id [S]`` sorted segment of each entry, ``start [G + 1]`` segment offsets."""
    cs = np.cumsum(x, axis=0, dtype=x.dtype if x.dtype.kind in "iu" else None)
    if cs.shape[0] == 0:
        return cs
    first = start[:-1]
    before = np.zeros((first.shape[0],) + x.shape[1:], dtype=cs.dtype)
    has_prev = (first > 0) & (first < start[1:])
    before[has_prev] = cs[first[has_prev] - 1]
    return cs - before[seg_id]
