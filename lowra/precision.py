"""Per-output-channel precision assignment: the two-stage ILP of LowRA (CVXPY + HiGHS).

Problem (the "flat" problem).  Channel ``c`` (one output row of one quantized matrix) has
``n_c`` parameters (its in-features) and a squared error ``e[c, j]`` when stored with
``candidates[j]`` bits.  Choose one candidate per channel to

    minimize  sum_c e[c, j_c]
    s.t.      sum_c n_c * b(j_c) <= B * sum_c n_c             (budget, never exceeded)
              sum_c n_c * b(j_c) >= B * sum_c n_c - max_c n_c (budget used up to one channel)

per budget group (the whole model, or each matrix).  This is a multiple-choice knapsack with
1.36 M channels for Llama-2-7B.

Bit costs.  Optionally (``bit_costs``) channel ``c`` costs an arbitrary ``w[c, j]`` bits at
candidate ``j`` (positive integers, strictly increasing in ``j``), e.g. its code bits plus its
share of codebook, scales and row index, so that the budget counts *stored* bits per weight:

    sum_c w[c, j_c] <= B * sum_c n_c                         (B still per parameter)
    sum_c w[c, j_c] >= B * sum_c n_c - max_c max_j (w[c, j+1] - w[c, j])

The fill row's slack is one channel's largest cost step: upgrading one step at a time from
the cheapest plan crosses the budget in steps no larger, so the window is never empty.
Everything below holds with ``n_c * b_j`` replaced by ``w[c, j]``: hull segments, the stage-1
budget rows, the prefix argument of stage 2, repair moves, the greedy baseline and the exact
ILP.  Without ``bit_costs``, ``w = n * cand`` and the plans are bit-identical to the planner
before costs existed (``bit_costs`` equal to ``n * cand`` is recognised as that default).
LowRA solves the problem in two stages:

0. **Clusters.**  Channels are partitioned by parameter count (with ``bit_costs``: by cost
   vector ``w[c, :]``, so keep the distinct cost vectors few, e.g. one per matrix shape);
   each partition is clustered by k-means (k-means++ seeding with a fixed seed, Lloyd on a
   seeded 64k subsample, then every channel to its nearest center) on the features
   ``log(e[c, j] / n_c)``.  With per-matrix budgets the clusters are then split by matrix.
   All channels of a cluster have the same ``n_c`` (or cost vector) and budget, so the budget
   only depends on *how many* channels of a cluster take each width.
1. **Stage 1 (integer program over clusters).**  Integer ``y[k, j]`` = number of channels of
   cluster ``k`` at candidate ``j``; ``sum_j y[k, j] = N_k``; the budget rows above.  The exact
   cost of counts ``y_k`` is ``f_k(y_k)``, the optimum of the stage-2 problem; ``f_k`` is convex
   (the value of an LP as a function of its right-hand side).  Stage 1 models ``f_k`` from
   inside by exact sums at sampled count vectors: ``y_k = sum_p mu[k, p] Y[k, p]``,
   ``sum_p mu[k, p] = 1``, ``mu >= 0``, cost ``sum_p mu[k, p] F[k, p]`` with
   ``F[k, p] = f_k(Y[k, p])`` exactly.  By convexity the modelled cost is an upper bound of
   ``f_k`` that is exact at the samples, so stage 2 can only do better than stage 1 predicts.
   The samples are the K *pure* points (all channels of the cluster at one width) plus
   ``samples + 1`` points along the cluster's own efficiency path (see ``_Segments``): the
   assignments reached by upgrading channels in decreasing order of error saved per bit.
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

3. **Repair.**  Stage 2 preserves the counts, so the budget rows of stage 1 hold exactly.  The
   counts are read back from floating point, so the plan is checked in exact integer arithmetic
   and, if needed, single-channel moves (best error per bit first) or pair exchanges restore
   both budget rows (``info["repair_moves"]``, 0 in every benchmark run).

``lower_bound`` is the LP relaxation of the flat problem, computed exactly by the classic
greedy on each channel's lower convex hull of ``(w[c, j], e[c, j])`` (Sinha & Zoltners 1979):
sort all hull segments by
error saved per bit, take them until the budget is used, the last one fractionally.  Its value
equals the HiGHS LP optimum (checked in the tests).  An LP optimum has at most one fractional
channel per budget row, so the integer optimum lies within one channel's error step of the
bound, and ``gap`` measures the true sub-optimality at scale.

Bits are counted as code bits per parameter (QLoRA/LoftQ convention): ``average_bits`` is
``sum_c n_c b_c / sum_c n_c``; with ``bit_costs`` the budget bounds ``average_cost_bits`` =
``sum_c w[c, j_c] / sum_c n_c`` instead, and both are reported.  Decision: a budget ``B`` is
read as the decimal the user wrote (``Fraction(str(B))``), so ``average_bits <= B`` (or
``average_cost_bits <= B``) holds exactly, also after float rounding.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = [
    "PrecisionPlan",
    "assign_precision",
    "lp_lower_bound",
    "exact_assignment",
    "greedy_assignment",
    "uniform_assignment",
    "synthetic_error_table",
    "llama_layer_shapes",
]

_ArrayLike = Any  # numpy array, torch tensor or nested sequence


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PrecisionPlan:
    """Result of :func:`assign_precision`.

    Attributes:
        bits: ``[C]`` int64, the bit-width of every channel (values from ``candidates``), in the
            order of the rows of ``errors``.
        candidates: the candidate widths, increasing.
        budget: the target average (code bits per parameter; with ``bit_costs``: cost bits
            per parameter).
        scope: ``"model"`` (one budget over all channels) or ``"matrix"`` (one per matrix).
        average_bits: parameter-weighted average of ``bits`` over all channels (code bits,
            also when ``bit_costs`` were given).
        objective: total SSE of the plan, ``sum_c errors[c, bits_c]``.
        lower_bound: LP-relaxation bound of the flat problem (same scope); no plan can beat it.
        gap: ``(objective - lower_bound) / lower_bound`` (0 when both are 0).
        stage1_objective: stage-1 modelled cost (an upper bound of ``objective`` before repair).
        times: seconds per stage: ``cluster``, ``bound``, ``stage1``, ``stage2``, ``repair``,
            ``total``.
        solver: which solver ran (name and versions).
        info: solver statuses and counters (stage-1 status and MIP gap, clusters per stage-2
            method, repair moves, ...).
        n_clusters: clusters over all partitions.
        params: ``[C]`` parameters per channel.
        layer_sizes: channels per matrix, in order, when known (for :meth:`split`).
        layer_index: ``[C]`` matrix index ``0..L-1`` of every channel when ``layer_ids`` were
            given (the sorted unique ids), else ``None``.
        average_cost_bits: ``sum_c bit_costs[c, j_c] / sum_c n_c`` when ``bit_costs`` were
            given (the quantity the budget bounds), else ``None``.
    """

    bits: np.ndarray
    candidates: tuple[int, ...]
    budget: float
    scope: str
    average_bits: float
    objective: float
    lower_bound: float
    gap: float
    stage1_objective: float
    times: dict[str, float]
    solver: str
    info: dict[str, Any]
    n_clusters: int
    params: np.ndarray
    layer_sizes: tuple[int, ...] | None = None
    layer_index: np.ndarray | None = None
    average_cost_bits: float | None = None

    def split(self, layer_sizes: Sequence[int] | None = None) -> list[np.ndarray]:
        """Split ``bits [C]`` back into one array per matrix, ``[rows_i]`` each, in order.

        ``layer_sizes`` defaults to the one given to :func:`assign_precision`; with
        ``layer_ids`` given there instead, one array per id (sorted ids), rows in order.
        """
        sizes = self.layer_sizes if layer_sizes is None else tuple(int(s) for s in layer_sizes)
        if sizes is None and self.layer_index is not None:
            order = np.argsort(self.layer_index, kind="stable")
            counts = np.bincount(self.layer_index)
            return np.split(self.bits[order], np.cumsum(counts)[:-1])
        if sizes is None:
            raise ValueError("layer_sizes unknown: pass layer_sizes to split() or assign_precision")
        if sum(sizes) != self.bits.shape[0]:
            raise ValueError(f"layer_sizes sum to {sum(sizes)} but the plan has "
                             f"{self.bits.shape[0]} channels")
        return np.split(self.bits, np.cumsum(sizes)[:-1])

    def layer_average_bits(self, layer_sizes: Sequence[int] | None = None) -> np.ndarray:
        """Parameter-weighted average bits of each matrix, ``[num_layers]`` float64."""
        out = []
        for b, n in zip(self.split(layer_sizes), _split_like(self, self.params, layer_sizes)):
            out.append(float((b * n).sum()) / float(n.sum()))
        return np.asarray(out)

    def counts(self) -> dict[int, int]:
        """Number of channels at each candidate width."""
        return {int(b): int((self.bits == b).sum()) for b in self.candidates}

    def summary(self) -> dict[str, Any]:
        """JSON-serializable scalars of the plan (no per-channel arrays)."""
        return {
            "candidates": list(self.candidates), "budget": self.budget, "scope": self.scope,
            "channels": int(self.bits.shape[0]), "average_bits": self.average_bits,
            "average_cost_bits": self.average_cost_bits,
            "objective": self.objective, "lower_bound": self.lower_bound, "gap": self.gap,
            "stage1_objective": self.stage1_objective, "times": dict(self.times),
            "solver": self.solver, "n_clusters": self.n_clusters,
            "counts": {str(k): v for k, v in self.counts().items()},
            "info": {k: v for k, v in self.info.items() if _jsonable(v)},
        }


def _split_like(plan: PrecisionPlan, x: np.ndarray,
                layer_sizes: Sequence[int] | None) -> list[np.ndarray]:
    """``x [C]`` split the way :meth:`PrecisionPlan.split` splits ``bits``."""
    view = dataclasses.replace(plan, bits=x)
    return view.split(layer_sizes)


def _jsonable(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, type(None), list, dict))


# --------------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Problem:
    """Validated inputs. ``e [C, K]`` float64, ``n [C]`` int64, ``cand [K]`` increasing,
    ``w [C, K]`` int64 bit cost of every channel at every width (``n_c * cand[j]`` unless
    ``bit_costs`` were given), ``group [C]`` budget group of each channel, ``cap [G]`` /
    ``lo [G]`` exact integer bounds on ``sum_c w[c, j_c]`` per group, ``fill [G]`` the slack of
    the fill row (``lo = cap-side target - fill``).  ``costed``: ``w`` is not ``n * cand``
    (clusters are then partitioned by cost vector instead of by ``n``).  ``unit_inc`` divides
    every ``w[c, j] - w[c, 0]``, ``unit_abs`` every ``w[c, j]``: the integer programs are
    written in these units.  ``given_costs``: ``bit_costs`` was passed (plans report
    ``average_cost_bits``)."""

    e: np.ndarray
    n: np.ndarray
    cand: np.ndarray
    w: np.ndarray
    group: np.ndarray
    cap: np.ndarray
    lo: np.ndarray
    fill: np.ndarray
    costed: bool
    given_costs: bool
    unit_inc: int
    unit_abs: int
    layer_sizes: tuple[int, ...] | None
    layer_of: np.ndarray | None


def _to_numpy(x: _ArrayLike, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name} cannot be converted to an array: {exc}") from exc


def _budget_fraction(budget: float) -> Fraction:
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating,
                                                           Fraction)):
        raise ValueError(f"budget must be a number, got {type(budget).__name__}")
    if not math.isfinite(float(budget)):
        raise ValueError(f"budget must be finite, got {budget}")
    if isinstance(budget, Fraction):
        return budget
    # The decimal the user wrote: 1.15 means 115/100, not the nearest binary double.
    return Fraction(repr(float(budget)))


def _check_costs(bit_costs: _ArrayLike, C: int, perm: np.ndarray) -> np.ndarray:
    """``bit_costs [C, K]`` (columns in the caller's candidate order) validated and permuted to
    increasing candidates: int64, positive, strictly increasing along every row."""
    K = perm.shape[0]
    w_raw = _to_numpy(bit_costs, "bit_costs")
    if w_raw.shape != (C, K):
        raise ValueError(f"bit_costs must have shape [{C}, {K}] (one row per row of errors, "
                         f"one column per candidate), got {w_raw.shape}")
    if w_raw.dtype == bool or not np.issubdtype(w_raw.dtype, np.number) or \
            np.iscomplexobj(w_raw):
        raise ValueError(f"bit_costs must be integers, got dtype {w_raw.dtype}")
    if np.issubdtype(w_raw.dtype, np.integer):
        w = w_raw.astype(np.int64)
    else:
        w_f = w_raw.astype(np.float64)
        if not np.isfinite(w_f).all():
            raise ValueError("bit_costs contains NaN or inf")
        if (w_f != np.round(w_f)).any() or (np.abs(w_f) >= 2.0**53).any():
            raise ValueError(f"bit_costs must be integers (bits), first non-integer at row "
                             f"{int((w_f != np.round(w_f)).any(1).argmax())}")
        w = w_f.astype(np.int64)
    w = np.ascontiguousarray(w[:, perm])
    if (w <= 0).any():
        raise ValueError(f"bit_costs must be positive (first non-positive at row "
                         f"{int((w <= 0).any(1).argmax())})")
    if K > 1 and (np.diff(w, axis=1) <= 0).any():
        raise ValueError(f"bit_costs must increase strictly with the candidate width in every "
                         f"row (first violation at row {int((np.diff(w, axis=1) <= 0).any(1).argmax())})")
    if (w[:, -1] >= 2**62 // C).any():
        raise ValueError("bit_costs too large: the sum over all rows overflows 64-bit integers")
    return w


def _prepare(errors: _ArrayLike, params: _ArrayLike, budget: float, candidates: Sequence[int],
             scope: str, layer_sizes: Sequence[int] | None,
             layer_ids: _ArrayLike | None, bit_costs: _ArrayLike | None = None) -> _Problem:
    cand_list = [int(c) for c in candidates]
    if len(cand_list) == 0:
        raise ValueError("candidates is empty")
    if any(c <= 0 for c in cand_list) or any(c != float(x) for c, x in zip(cand_list, candidates)):
        raise ValueError(f"candidates must be positive integers, got {tuple(candidates)}")
    if len(set(cand_list)) != len(cand_list):
        raise ValueError(f"candidates contain duplicates: {tuple(candidates)}")
    perm = np.argsort(cand_list)
    cand = np.asarray(cand_list, dtype=np.int64)[perm]

    e = _to_numpy(errors, "errors")
    if e.ndim != 2:
        raise ValueError(f"errors must be 2-D [channels, candidates], got shape {e.shape}")
    if e.shape[1] != len(cand):
        raise ValueError(f"errors has {e.shape[1]} columns but there are {len(cand)} "
                         f"candidates {tuple(cand_list)}")
    if e.shape[0] == 0:
        raise ValueError("errors has no channels")
    if not np.issubdtype(e.dtype, np.number) or np.iscomplexobj(e):
        raise ValueError(f"errors must be real numbers, got dtype {e.dtype}")
    e = np.ascontiguousarray(e[:, perm], dtype=np.float64)
    if np.isnan(e).any():
        raise ValueError(f"errors contains NaN (first at channel {int(np.isnan(e).any(1).argmax())})")
    if np.isinf(e).any():
        raise ValueError(f"errors contains inf (first at channel {int(np.isinf(e).any(1).argmax())})")
    if (e < 0).any():
        raise ValueError(f"errors contains negative values (first at channel "
                         f"{int((e < 0).any(1).argmax())}); SSE is never negative")
    C, K = e.shape

    n_raw = _to_numpy(params, "params")
    if n_raw.ndim != 1 or n_raw.shape[0] != C:
        raise ValueError(f"params must have shape [{C}] (one entry per row of errors), got "
                         f"{n_raw.shape}")
    if not np.issubdtype(n_raw.dtype, np.number):
        raise ValueError(f"params must be numbers, got dtype {n_raw.dtype}")
    n_f = n_raw.astype(np.float64)
    if not np.isfinite(n_f).all():
        raise ValueError("params contains NaN or inf")
    if (n_f <= 0).any() or (n_f != np.round(n_f)).any():
        raise ValueError("params must be positive integers (parameters per channel)")
    n = n_f.astype(np.int64)

    w = n[:, None] * cand[None, :]
    given = bit_costs is not None
    costed = False
    if given:
        w_given = _check_costs(bit_costs, C, perm)
        costed = not np.array_equal(w_given, w)  # n * cand given explicitly: the default
        w = w_given

    B = _budget_fraction(budget)
    if costed:
        pass  # the budget range is checked per group below, against the costs
    elif B < int(cand[0]):
        raise ValueError(f"budget {float(B)} is below the smallest candidate {int(cand[0])} bits: "
                         "no assignment meets it")
    elif B > int(cand[-1]):
        raise ValueError(f"budget {float(B)} is above the largest candidate {int(cand[-1])} bits: "
                         "it cannot be used up (use the largest candidate, or add a wider one)")

    sizes: tuple[int, ...] | None = None
    layer_of: np.ndarray | None = None
    if layer_sizes is not None and layer_ids is not None:
        raise ValueError("give layer_sizes or layer_ids, not both")
    if layer_sizes is not None:
        sizes = tuple(int(s) for s in layer_sizes)
        if any(s <= 0 for s in sizes) or sum(sizes) != C:
            raise ValueError(f"layer_sizes must be positive and sum to the {C} channels, "
                             f"got sum {sum(sizes)}")
        layer_of = np.repeat(np.arange(len(sizes)), sizes)
    elif layer_ids is not None:
        ids = _to_numpy(layer_ids, "layer_ids")
        if ids.shape != (C,):
            raise ValueError(f"layer_ids must have shape [{C}], got {ids.shape}")
        _, layer_of = np.unique(ids, return_inverse=True)
        layer_of = layer_of.reshape(-1)

    if scope == "model":
        group = np.zeros(C, dtype=np.int64)
    elif scope == "matrix":
        if layer_of is None:
            raise ValueError('scope="matrix" needs layer_sizes or layer_ids')
        group = layer_of.astype(np.int64)
    else:
        raise ValueError(f'scope must be "model" or "matrix", got {scope!r}')

    G = int(group.max()) + 1
    tot = np.zeros(G, dtype=object)
    np.add.at(tot, group, n.astype(object))  # exact Python ints (sum n can exceed 2**53)
    cap = np.array([math.floor(B * int(t)) for t in tot], dtype=np.int64)
    # all-narrowest (cheapest) and all-widest totals per group: int64 is exact (checked above)
    least = np.zeros(G, dtype=np.int64)
    np.add.at(least, group, w[:, 0])
    if costed:
        most = np.zeros(G, dtype=np.int64)
        np.add.at(most, group, w[:, -1])
        for g in range(G):
            where = "" if G == 1 else f" in budget group {g}"
            if cap[g] < least[g]:
                raise ValueError(
                    f"budget {float(B)} bits per parameter is below the cheapest plan under "
                    f"bit_costs{where} ({int(least[g]) / int(tot[g]):.6g}: every row at its "
                    "narrowest width): no assignment meets it")
            if B * int(tot[g]) > int(most[g]):
                raise ValueError(
                    f"budget {float(B)} bits per parameter is above the most expensive plan "
                    f"under bit_costs{where} ({int(most[g]) / int(tot[g]):.6g}: every row at "
                    "its widest width): it cannot be used up")
        # the fill row: within one cost step of the budget (always reachable: upgrading one
        # step at a time from the cheapest plan crosses the budget in steps of at most that)
        fill = np.zeros(G, dtype=np.int64)
        if K > 1:
            np.maximum.at(fill, group, np.diff(w, axis=1).max(1))
        unit_inc = int(np.gcd.reduce((w[:, 1:] - w[:, :1]).ravel())) if K > 1 else 1
        unit_abs = int(np.gcd.reduce(w.ravel()))
    else:
        fill = np.zeros(G, dtype=np.int64)  # one bit per parameter of the widest channel
        np.maximum.at(fill, group, n)
        unit_inc = unit_abs = int(np.gcd.reduce(n))
    lo = np.array([max(math.ceil(B * int(t) - int(m)), int(lw))
                   for t, m, lw in zip(tot, fill, least)], dtype=np.int64)
    return _Problem(e=e, n=n, cand=cand, w=w, group=group, cap=cap, lo=lo, fill=fill,
                    costed=costed, given_costs=given, unit_inc=max(unit_inc, 1),
                    unit_abs=max(unit_abs, 1), layer_sizes=sizes, layer_of=layer_of)


# --------------------------------------------------------------------------------------------
# Convex-hull segments and the LP bound
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# HiGHS through CVXPY
# --------------------------------------------------------------------------------------------
def _solver_name() -> str:
    import cvxpy as cp
    import highspy  # noqa: F401
    try:
        from importlib.metadata import version
        hv = version("highspy")
    except Exception:  # pragma: no cover
        hv = "?"
    return f"HIGHS (highspy {hv}) via CVXPY {cp.__version__}"


_BANNER_DONE = False


def _silence_banner() -> None:
    """HiGHS prints a copyright banner from the first ``Highs()`` of a process, before any
    option can be set; create that first instance with the C-level stdout muted."""
    global _BANNER_DONE
    if _BANNER_DONE:
        return
    import os
    import sys

    import highspy

    _BANNER_DONE = True
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real stdout: nothing to protect
        highspy.Highs()
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _solve(prob: Any, opts: dict[str, Any], highs: dict[str, Any] | None = None) -> None:
    """Solve a CVXPY problem with HiGHS; ``opts`` are CVXPY/HiGHS keyword options (None
    values dropped), ``highs`` options that clash with CVXPY's own names (``solver``)."""
    import cvxpy as cp
    if "HIGHS" not in cp.installed_solvers():
        raise RuntimeError("CVXPY does not see HiGHS: pip install highspy")
    kw = {k: v for k, v in opts.items() if v is not None}
    if kw.get("threads") is not None:
        # HiGHS fixes its thread pool on the first solve of the process; a different
        # ``threads`` later fails unless the global scheduler is reset first.
        import highspy

        highspy.Highs.resetGlobalScheduler(True)
    if not kw.get("verbose"):
        kw.setdefault("output_flag", False)
        _silence_banner()
    if highs:
        kw["highs_options"] = dict(highs)
    prob.solve(solver=cp.HIGHS, **kw)


# --------------------------------------------------------------------------------------------
# Two-stage solver
# --------------------------------------------------------------------------------------------
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
    time_limit: float | None = 300.0,
    mip_rel_gap: float | None = 1e-4,
    threads: int | None = None,
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
            the paper's cluster-mean cost (see the module docstring).  Default (``None``): 32
            for the model scope, 8 for the matrix scope (its clusters are split by matrix, so
            smaller, and stage 1 has ~100x more of them).
        time_limit, mip_rel_gap, threads: passed to HiGHS (stage 1 and stage 2).  Defaults:
            300 s and a 1e-4 relative MIP gap.  Proving the stage-1 optimum to 1e-6 can take
            minutes on small models (77 s for stories260K's 3,000 channels at 1.15 bits) for no
            measurable gain: at 1e-4 the same plans solve in ~1 s and stay within 0.02 % of
            ``lower_bound``, which ``gap`` reports for every plan.  A stage 1 cut by the time
            limit still yields a valid plan (repair), recorded in ``info``.
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
    if int(clusters) < 1:
        raise ValueError(f"clusters must be >= 1, got {clusters}")
    if stage2 not in ("combinatorial", "lp"):
        raise ValueError(f'stage2 must be "combinatorial" or "lp", got {stage2!r}')
    if samples is None:
        samples = 32 if scope == "model" else 8
    if int(samples) < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    e, n, cand = p.e, p.n, p.cand
    C = e.shape[0]
    opts: dict[str, Any] = {"verbose": verbose, "time_limit": time_limit, "threads": threads}
    opts.update(solver_options or {})
    times: dict[str, float] = {}
    info: dict[str, Any] = {}

    # ---- bound (also builds the hull segments the stage-1 samples use) ----
    t0 = time.perf_counter()
    seg = _hull_segments(e, p.w)
    lb_groups, _ = _group_lp_bounds(p, seg)
    lower_bound = float(lb_groups.sum())
    times["bound"] = time.perf_counter() - t0

    # ---- clusters ----
    t0 = time.perf_counter()
    lab = _cluster(p, int(clusters), int(seed), int(kmeans_iters), int(kmeans_sample))
    G = int(lab.max()) + 1
    Nk = np.bincount(lab, minlength=G)
    wk = np.zeros((G, cand.shape[0]), dtype=np.int64)
    wk[lab] = p.w  # one cost vector per cluster (clusters are partitioned by it)
    gk = np.zeros(G, dtype=np.int64)
    gk[lab] = p.group
    times["cluster"] = time.perf_counter() - t0

    # ---- stage 1 ----
    t0 = time.perf_counter()
    path = _ClusterPaths(seg, lab, wk)
    del seg
    Y, F, pk = path.sample_points(Nk, int(samples), e, lab)
    s1_opts = dict(opts)
    if mip_rel_gap is not None:
        s1_opts["mip_rel_gap"] = mip_rel_gap
    # Counts reach 1e4 and come out of mu @ Y products carrying ~1e-5 of float noise: at
    # HiGHS' default 1e-6 an integral LP vertex looks fractional and the search runs on for
    # seconds to minutes.  1e-4 absolute is 1e-8 relative; rounding is checked exactly after.
    s1_opts.setdefault("mip_feasibility_tolerance", 1e-4)
    emax = np.full((G, e.shape[1]), -np.inf)
    emin = np.full((G, e.shape[1]), np.inf)
    np.maximum.at(emax, lab, e)
    np.minimum.at(emin, lab, e)
    Yint, stage1_obj, s1info = _stage1(p, Y, F, pk, Nk, wk, gk, emax, emin, s1_opts)
    info.update(s1info)
    times["stage1"] = time.perf_counter() - t0

    # ---- stage 2 ----
    t0 = time.perf_counter()
    jidx, s2info = _stage2(e, lab, Yint, path, opts, stage2)
    info.update(s2info)
    times["stage2"] = time.perf_counter() - t0

    # ---- repair ----
    t0 = time.perf_counter()
    jidx, moves, filled = _repair(p, jidx)
    info["repair_moves"] = moves
    info["budget_filled"] = filled
    times["repair"] = time.perf_counter() - t0

    bits = cand[jidx].astype(np.int64)
    objective = float(e[np.arange(C), jidx].sum())
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
    return Yint, total, info


_STAGE1_MAX_POINTS = 10_000  # per program (matrix scope): ~1 s of HiGHS each


def _stage1_program(Y: np.ndarray, F: np.ndarray, pk: np.ndarray, Nk: np.ndarray,
                    dwk: np.ndarray, gk: np.ndarray, cap_u: np.ndarray, lo_u: np.ndarray,
                    cand: np.ndarray, emax: np.ndarray, emin: np.ndarray,
                    opts: dict[str, Any]) -> tuple[np.ndarray, float, dict[str, Any]]:
    """One stage-1 program over a set of whole budget groups (local indices): clusters
    ``Nk``, ``dwk [G, K-1]`` (cost of one channel at width ``j >= 1`` above the narrowest, in
    units ``u``), ``gk``; budget rows ``lo_u <= . <= cap_u`` per group.
    Returns counts ``[G, K]``, the modelled SSE and the solver status."""
    import cvxpy as cp

    G, K = Nk.shape[0], cand.shape[0]
    ngrp = cap_u.shape[0]
    npts = F.shape[0]
    scale = max(float(F.max()), 1e-300)
    mu = cp.Variable(npts, nonneg=True)
    # Integer counts above the narrowest width, z [G, K-1]; the narrowest takes the rest.
    # Every budget coefficient is then >= 0 and rounding z down stays feasible, so HiGHS'
    # rounding heuristics find near-LP solutions at once.
    z = cp.Variable(G * (K - 1), integer=True) if K > 1 else None
    A_sum = sp.csr_matrix((np.ones(npts), (pk, np.arange(npts))), shape=(G, npts))
    rows = (pk[:, None] * K + np.arange(K)[None, :]).ravel()
    cols = np.repeat(np.arange(npts), K)
    A_cnt = sp.csr_matrix((Y.ravel().astype(np.float64), (rows, cols)), shape=(G * K, npts))
    s_plus = cp.Variable(G * K, nonneg=True)
    s_minus = cp.Variable(G * K, nonneg=True)
    objective = cp.Minimize((F / scale) @ mu + (emax.ravel() / scale) @ s_plus
                            - (emin.ravel() / scale) @ s_minus)
    offset = np.zeros(G * K)
    offset[np.arange(G) * K] = Nk
    cons = [A_sum @ mu == 1]
    if z is None:
        cons.append(A_cnt @ mu + s_plus - s_minus == offset)
        budget_rows: list[Any] = []
        budget_lo: list[Any] = []
        W = None
    else:
        kk = np.repeat(np.arange(G), K - 1)
        jj = np.tile(np.arange(1, K), G)
        T = sp.csr_matrix((np.concatenate([np.ones(kk.size), -np.ones(kk.size)]),
                           (np.concatenate([kk * K + jj, kk * K]),
                            np.concatenate([np.arange(kk.size)] * 2))), shape=(G * K, kk.size))
        S = sp.csr_matrix((np.ones(kk.size), (kk, np.arange(kk.size))), shape=(G, kk.size))
        W = sp.csr_matrix((dwk.ravel().astype(np.float64),
                           (np.repeat(gk, K - 1), np.arange(kk.size))), shape=(ngrp, kk.size))
        cons += [A_cnt @ mu + s_plus - s_minus == T @ z + offset, z >= 0, S @ z <= Nk]
        budget_rows = [W @ z <= cap_u]
        budget_lo = [W @ z >= lo_u]
    prob = cp.Problem(objective, cons + budget_rows)
    _solve(prob, opts)
    info: dict[str, Any] = {"fill_row": "not needed"}

    def value() -> np.ndarray | None:
        if z is None:
            return np.asarray(Nk, dtype=np.float64)[:, None] if prob.value is not None else None
        if z.value is None:
            return None
        zv = np.asarray(z.value).reshape(G, K - 1)
        return np.concatenate([(Nk - zv.sum(1))[:, None], zv], 1)

    Yf = value()
    if Yf is not None and W is not None:
        used = W @ np.rint(Yf[:, 1:]).ravel()
        if not (used >= lo_u - 1e-6).all():
            prob = cp.Problem(objective, cons + budget_rows + budget_lo)
            _solve(prob, opts)
            info["fill_row"] = "enforced"
            Yf = value()
            if Yf is None:  # the window is unreachable for the solver: repair fills it
                prob = cp.Problem(objective, cons + budget_rows)
                _solve(prob, opts)
                info["fill_row"] = "unreachable: repair"
                Yf = value()
    if Yf is None:
        raise RuntimeError(f"stage-1 integer program failed: {prob.status}")
    info["status"] = prob.status
    stats = getattr(prob.solver_stats, "extra_stats", None)
    if stats is not None:
        info["mip_gap"] = float(getattr(stats, "mip_gap", float("nan")))
    return _round_counts(Yf, Nk), float(prob.value) * scale, info


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


class _ClusterPaths:
    """Every cluster's efficiency path: its channels' hull segments sorted by decreasing
    error saved per bit (ties: channel, then the channel's own order).  A prefix of ``m``
    segments is a threshold assignment, optimal for its own counts (module docstring).

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


# --------------------------------------------------------------------------------------------
# References and baselines (tests and benchmark)
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Synthetic error tables shaped like real ones
# --------------------------------------------------------------------------------------------
# Weighted Lloyd-Max distortion D(b; df) = SSE / sum(x^2) of per-row codebooks on Student-t
# rows (groups of 64 normalized by absmax, weights absmax^2, 2^20 samples, 60 iterations):
# measured once with the codebook recipe of METHOD.md section 1.
_DF = np.array([3.0, 4.0, 5.0, 7.0, 10.0, 30.0, np.inf])
_D_TABLE = {
    1: [0.6346, 0.5706, 0.5095, 0.4553, 0.4247, 0.3870, 0.3728],
    2: [0.2199, 0.1979, 0.1750, 0.1539, 0.1411, 0.1247, 0.1182],
    3: [0.0497, 0.0471, 0.0437, 0.0397, 0.0370, 0.0331, 0.0316],
    4: [0.01118, 0.01082, 0.01013, 0.00938, 0.00882, 0.00801, 0.00767],
}


def llama_layer_shapes(num_layers: int, hidden: int, ffn: int) -> list[tuple[int, int]]:
    """``(rows, in_features)`` of the 7 projections of a Llama block, ``num_layers`` times:
    q, k, v, o ``(hidden, hidden)``, gate, up ``(ffn, hidden)``, down ``(hidden, ffn)``.
    Llama-2-7B: ``(32, 4096, 11008)`` = 1,359,872 channels; 13B: ``(40, 5120, 13824)``."""
    block = [(hidden, hidden)] * 4 + [(ffn, hidden)] * 2 + [(hidden, ffn)]
    return block * num_layers


def synthetic_error_table(
    layer_shapes: Sequence[tuple[int, int]],
    candidates: Sequence[int] = (1, 2, 4),
    seed: int = 0,
    row_scale_sigma: float = 0.5,
    layer_scale_sigma: float = 0.3,
    noise_sigma: float = 0.03,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Per-channel SSE tables shaped like real ones, for tests and benchmarks.

    Row ``c`` of a matrix with ``n`` inputs holds Student-t weights: variance
    ``sigma_c^2 = s_layer * exp(N(0, row_scale_sigma^2))`` (lognormal per row and per matrix)
    and tail index ``df_c = 2 + exp(N(log 4, 0.5^2))`` (median 6, heavier or lighter per
    row).  ``SSE(b) = n * sigma_c^2 * D(b; df_c) * exp(eps_c + eps_cb)`` with ``D`` the
    measured weighted Lloyd-Max distortion of such rows (``_D_TABLE``: 0.51 / 0.175 / 0.044 /
    0.010 at 1/2/3/4 bits for df=5; 0.37 / 0.12 / 0.032 / 0.0077 for Gaussian rows),
    interpolated in ``1/df``, so the ratios between widths vary per channel; ``eps`` is
    finite-sample noise (shared 0.05, per width ``noise_sigma``).  Widths above 4 bits extend
    the table by the high-rate 4x per bit.  SSE decreases strictly with the width.

    Returns ``errors [C, K]`` float64, ``params [C]`` int64, ``layer_sizes``.
    """
    rng = np.random.default_rng(seed)
    cand = [int(c) for c in candidates]
    sizes = [int(r) for r, _ in layer_shapes]
    n = np.repeat([int(i) for _, i in layer_shapes], sizes).astype(np.int64)
    C = n.shape[0]
    layer_scale = np.exp(rng.normal(0.0, layer_scale_sigma, len(sizes)))
    var = np.repeat(layer_scale, sizes) * np.exp(rng.normal(0.0, row_scale_sigma, C))
    df = 2.0 + np.exp(rng.normal(math.log(4.0), 0.5, C))
    xs = 1.0 / _DF[::-1]  # increasing in 1/df (0 = Gaussian)
    common = rng.normal(0.0, 0.05, C)
    errors = np.empty((C, len(cand)))
    for j, b in enumerate(cand):
        bb = min(max(b, 1), 4)
        logd = np.interp(1.0 / df, xs, np.log(np.asarray(_D_TABLE[bb]))[::-1])
        logd += (b - bb) * math.log(0.25)  # 4x per extra bit (above 4) or per missing one
        errors[:, j] = n * var * np.exp(logd + common + rng.normal(0.0, noise_sigma, C))
    order = np.argsort(cand)
    for a, b in zip(order[:-1], order[1:]):
        errors[:, b] = np.minimum(errors[:, b], errors[:, a] * 0.999)
    return errors, n, sizes
