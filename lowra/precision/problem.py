"""Input checking: the flat problem's arrays validated into :class:`_Problem`.

Every entry point (:func:`~lowra.precision.assign.assign_precision`, the bound, the baselines)
goes through :func:`_prepare`, so all of them accept the same inputs and raise the same
ValueErrors.  Budgets and costs become exact integers here: the budget rows per group
(``cap``, ``lo``, ``fill``) are computed with Python integers and the user's decimal budget
(``Fraction(repr(B))``), so ``average_bits <= B`` holds exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

_ArrayLike = Any  # numpy array, torch tensor or nested sequence


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
    """Every input of the precision plan checked (ValueError naming the first fault, in this order:
    candidates, errors, params, bit_costs, budget, layers, scope, budget against costs) and turned
    into a :class:`_Problem` with candidates in increasing order (``errors``' and ``bit_costs``'
    columns permuted alike) and the exact integer budget rows of every budget group."""
    cand_list, perm = _check_candidates(candidates)
    cand = np.asarray(cand_list, dtype=np.int64)[perm]
    e = _check_errors(errors, cand_list, perm)
    C = e.shape[0]
    n = _check_params(params, C)

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

    sizes, layer_of = _layer_of_channels(layer_sizes, layer_ids, C)
    if scope == "model":
        group = np.zeros(C, dtype=np.int64)
    elif scope == "matrix":
        if layer_of is None:
            raise ValueError('scope="matrix" needs layer_sizes or layer_ids')
        group = layer_of.astype(np.int64)
    else:
        raise ValueError(f'scope must be "model" or "matrix", got {scope!r}')

    cap, lo, fill, unit_inc, unit_abs = _budget_rows(B, n, w, group, costed)
    return _Problem(e=e, n=n, cand=cand, w=w, group=group, cap=cap, lo=lo, fill=fill,
                    costed=costed, given_costs=given, unit_inc=max(unit_inc, 1),
                    unit_abs=max(unit_abs, 1), layer_sizes=sizes, layer_of=layer_of)


def _check_candidates(candidates: Sequence[int]) -> tuple[list[int], np.ndarray]:
    """The candidate widths as Python ints ``[K]`` in the caller's order, and the permutation
    ``[K]`` that sorts them; refuses an empty list, non-positive or fractional widths, duplicates."""
    cand_list = [int(c) for c in candidates]
    if len(cand_list) == 0:
        raise ValueError("candidates is empty")
    if any(c <= 0 for c in cand_list) or any(c != float(x) for c, x in zip(cand_list, candidates)):
        raise ValueError(f"candidates must be positive integers, got {tuple(candidates)}")
    if len(set(cand_list)) != len(cand_list):
        raise ValueError(f"candidates contain duplicates: {tuple(candidates)}")
    return cand_list, np.argsort(cand_list)


def _check_errors(errors: _ArrayLike, cand_list: list[int], perm: np.ndarray) -> np.ndarray:
    """``errors [C, K]`` as contiguous float64 with columns permuted to increasing candidates;
    refuses a wrong shape, no channels, non-real dtypes, NaN, inf and negative SSE (naming the
    first bad channel)."""
    e = _to_numpy(errors, "errors")
    if e.ndim != 2:
        raise ValueError(f"errors must be 2-D [channels, candidates], got shape {e.shape}")
    if e.shape[1] != len(cand_list):
        raise ValueError(f"errors has {e.shape[1]} columns but there are {len(cand_list)} "
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
    return e


def _check_params(params: _ArrayLike, C: int) -> np.ndarray:
    """``params [C]`` (parameters per channel) as int64; refuses a wrong shape, non-numbers,
    NaN/inf and anything but positive integers."""
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
    return n_f.astype(np.int64)


def _layer_of_channels(layer_sizes: Sequence[int] | None, layer_ids: _ArrayLike | None,
                       C: int) -> tuple[tuple[int, ...] | None, np.ndarray | None]:
    """``(layer_sizes as a tuple or None, layer_of [C] matrix index of every channel or None)``
    from either ``layer_sizes`` (channels per matrix, in order) or ``layer_ids [C]`` (any labels,
    numbered in sorted order), never both."""
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
    return sizes, layer_of


def _budget_rows(B: Fraction, n: np.ndarray, w: np.ndarray, group: np.ndarray,
                 costed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """The exact budget rows of every group ``g`` (``group [C]``, ``n [C]``, costs ``w [C, K]``):
    ``cap [G] = floor(B * sum n)``, ``lo [G]`` (at least the cheapest plan, and within ``fill [G]``
    of the budget: one bit per parameter of the widest channel, or with ``costed`` the largest cost
    step of one channel) and the units ``unit_inc`` / ``unit_abs`` (gcds of the cost steps and of
    the costs). With ``costed``, refuses a budget below the cheapest or above the dearest plan."""
    K = w.shape[1]
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
    return cap, lo, fill, unit_inc, unit_abs
