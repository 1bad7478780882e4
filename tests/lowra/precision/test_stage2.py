"""Stage 2 (lowra/precision/stage2.py): exact per-cluster assignment for any counts."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from lowra.precision.bounds import _hull_segments
from lowra.precision.efficiency_paths import _ClusterPaths
from lowra.precision.stage2 import _stage2


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
