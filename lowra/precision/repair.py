"""Repair: the plan checked in exact integer arithmetic against both budget rows.

3. **Repair.**  Stage 2 preserves the counts, so the budget rows of stage 1 hold exactly.  The
   counts are read back from floating point, so the plan is checked in exact integer arithmetic
   and, if needed, single-channel moves (best error per bit first) or pair exchanges restore
   both budget rows (``info["repair_moves"]``, 0 in every benchmark run).
"""

from __future__ import annotations

import numpy as np

from lowra.precision.problem import _Problem


def _repair(p: _Problem, jidx: np.ndarray) -> tuple[np.ndarray, int, bool]:
    """Exact integer check of both budget rows per group; local moves fix them.

    Over the cap: downgrade the channels losing the least error per bit freed (always
    possible: the all-narrowest plan fits).  Below the fill row: upgrade the channel gaining
    the most error per bit that still fits; when no single upgrade fits, exchange a pair (one
    channel up, another down, net bits in ``(0, slack]``) at the least error increase.
    Returns the candidate indices, the number of moves (0 when stage 1 was exact) and whether
    every fill row holds.  Raises RuntimeError if a cap could not be restored (a bug).
    """
    e, w, K = p.e, p.w, p.cand.shape[0]
    rows = np.arange(e.shape[0])
    jidx = jidx.copy()
    moves = 0
    G = p.cap.shape[0]
    for _ in range(4 * K + 16):
        used = np.zeros(G, dtype=np.int64)
        np.add.at(used, p.group, w[rows, jidx])
        over = used - p.cap
        under = p.lo - used
        bad = np.nonzero((over > 0) | (under > 0))[0]
        if bad.size == 0:
            break
        progress = 0
        for g in bad:
            sel = np.nonzero(p.group == g)[0]
            if over[g] > 0:
                progress += _greedy_moves(e, w, jidx, sel, int(over[g]), down=True)
            else:
                slack = int(p.cap[g] - used[g])
                k = _greedy_moves(e, w, jidx, sel, int(under[g]), down=False, slack=slack)
                if k == 0:
                    k = _pair_exchange(e, w, jidx, sel, slack)
                progress += k
        moves += progress
        if progress == 0:
            break
    used = np.zeros(G, dtype=np.int64)
    np.add.at(used, p.group, w[rows, jidx])
    if (used > p.cap).any():  # pragma: no cover - downgrades always restore the cap
        raise RuntimeError("precision plan exceeds the budget after repair")
    return jidx, moves, bool((used >= p.lo).all())


def _pair_exchange(e: np.ndarray, w: np.ndarray, jidx: np.ndarray, sel: np.ndarray,
                   slack: int) -> int:
    """One exchange in place on channels ``sel``: channel ``u`` one width up, channel
    ``d != u`` one width down, ``0 < added - freed <= slack``, least error increase.
    Candidates: the two best channels per distinct step size either way.  ``w [C, K]`` bit
    costs.  Returns 1 or 0."""
    K = w.shape[1]
    j = jidx[sel]

    def best_per_step(ch: np.ndarray, dw: np.ndarray, score: np.ndarray) -> list[tuple]:
        out = []
        for w in np.unique(dw):
            m = np.nonzero(dw == w)[0]
            top = m[np.argsort(score[m], kind="stable")[:2]]
            out += [(int(w), int(ch[i]), float(score[i])) for i in top]
        return out

    up = j < K - 1
    cu, ju = sel[up], j[up]
    ups = best_per_step(cu, w[cu, np.minimum(ju + 1, K - 1)] - w[cu, ju],
                        e[cu, np.minimum(ju + 1, K - 1)] - e[cu, ju])  # error change
    dn = j > 0
    cd, jd = sel[dn], j[dn]
    downs = best_per_step(cd, w[cd, jd] - w[cd, np.maximum(jd - 1, 0)],
                          e[cd, np.maximum(jd - 1, 0)] - e[cd, jd])
    best = None
    for wu, u, su in ups:
        for wd, d, sd in downs:
            if u != d and 0 < wu - wd <= slack and (best is None or su + sd < best[0]):
                best = (su + sd, u, d)
    if best is None:
        return 0
    jidx[best[1]] += 1
    jidx[best[2]] -= 1
    return 1


def _greedy_moves(e: np.ndarray, w: np.ndarray, jidx: np.ndarray, sel: np.ndarray,
                  need: int, down: bool, slack: int = 0) -> int:
    """Apply single-step moves in place on channels ``sel`` until ``need`` bits (of the costs
    ``w [C, K]``) are freed (down) or added without exceeding ``slack`` (up).  Returns the
    number of moves."""
    K = w.shape[1]
    j = jidx[sel]
    moves = 0
    if down:
        ok = j > 0
        ch, jj = sel[ok], j[ok]
        dw = w[ch, jj] - w[ch, jj - 1]
        loss = e[ch, jj - 1] - e[ch, jj]
        order = np.argsort(loss / dw, kind="stable")
        freed = np.cumsum(dw[order])
        t = int(np.searchsorted(freed, need)) + 1
        take = order[:t]
        jidx[ch[take]] -= 1
        return int(take.shape[0])
    ok = j < K - 1
    ch, jj = sel[ok], j[ok]
    dw = w[ch, jj + 1] - w[ch, jj]
    fits = dw <= slack
    ch, jj, dw = ch[fits], jj[fits], dw[fits]
    gain = e[ch, jj] - e[ch, jj + 1]
    order = np.argsort(-gain / dw, kind="stable")
    added = 0
    for i in order:  # each move adds >= one cost step, need <= the fill slack: a few steps
        if added >= need:
            break
        if dw[i] <= slack - added:
            jidx[ch[i]] += 1
            added += int(dw[i])
            moves += 1
    return moves
