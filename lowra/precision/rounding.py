"""The LP optimum rounded down: a second plan, within one channel's step of the lower bound.

4. **LP rounding.**  The flat problem's LP optimum (:mod:`lowra.precision.bounds`) takes every channel's
   hull segments in decreasing order of error saved per bit and stops inside one segment.  Rounding it
   down gives an integer plan; the budget left over is then filled by the later segments that still fit,
   in the same order (a channel's segments stay in order: one is taken only after the previous one).
   Its excess over the bound is at most the error of the one segment cut, so on large models it lies
   within ~1e-6 of the bound; the two-stage plan's error model (clusters, sampled paths) can be far
   looser: on SmolLM2's K-FAC table at 3 bits it stayed 4 % above the bound, where this plan is 1e-6
   above it (``python -m experiments.bench.plan``).  :func:`assign_precision` keeps the better of the two
   (ties: the two-stage plan) and says which in ``info["plan_source"]``.
"""

from __future__ import annotations

import numpy as np

from lowra.precision.bounds import _Segments, _stable_by
from lowra.precision.problem import _Problem


def _lp_rounding(p: _Problem, seg: _Segments) -> np.ndarray:
    """Candidate index ``[C]`` of every channel: the LP optimum rounded down, then filled greedily."""
    C, G = p.e.shape[0], p.cap.shape[0]
    jidx = np.zeros(C, dtype=np.int64)
    base = np.zeros(G, dtype=np.int64)
    np.add.at(base, p.group, p.w[:, 0])
    order = seg.order_r if G == 1 else _stable_by(p.group[seg.ch], seg.order_r)
    starts = np.searchsorted(p.group[seg.ch[order]], np.arange(G + 1))
    for g in range(G):
        seq = order[starts[g]:starts[g + 1]]
        slack = int(p.cap[g] - base[g])
        used = np.cumsum(seg.dw[seq])
        t = int(np.searchsorted(used, slack, side="right"))  # segments taken whole, in order
        taken = seq[:t]
        np.maximum.at(jidx, seg.ch[taken], seg.dst[taken].astype(np.int64))  # a channel's last segment taken
        slack -= int(used[t - 1]) if t else 0
        rest = seq[t:]
        rest = rest[seg.dw[rest] <= slack]  # only these can still fit
        for s in rest:  # few: the slack is below one segment's cost
            c = seg.ch[s]
            if jidx[c] == seg.src[s] and seg.dw[s] <= slack:
                jidx[c] = seg.dst[s]
                slack -= int(seg.dw[s])
    return jidx

