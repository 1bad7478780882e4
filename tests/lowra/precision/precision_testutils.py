"""Shared helpers of the precision planner's tests: small synthetic tables and budget checks."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from lowra.precision.synthetic import llama_layer_shapes, synthetic_error_table

# 4*192 + 2*384 + 192 = 1,728 channels of 192 and 384 inputs: a miniature Llama block.
SMALL = llama_layer_shapes(1, 192, 384)
# 4*64 + 2*128 + 64 = 576 channels of 64 and 128 inputs: two partitions, exact ILP in ~1 s.
TINY = llama_layer_shapes(1, 64, 128)


def small_table(seed: int, candidates=(1, 2, 4)):
    return synthetic_error_table(SMALL, candidates=candidates, seed=seed)


def plan_sse(e: np.ndarray, bits: np.ndarray, candidates) -> float:
    col = np.searchsorted(np.asarray(candidates), bits)
    return float(e[np.arange(e.shape[0]), col].sum())


def assert_budget(bits: np.ndarray, n: np.ndarray, budget: float) -> None:
    """Never above the budget (exact rationals), and at most max(n) bits below it."""
    used = int((n * bits).sum())
    cap = Fraction(repr(budget)) * int(n.sum())
    assert used <= cap
    assert cap - used <= int(n.max())


def stored_costs(n: np.ndarray, cands) -> np.ndarray:
    """Non-proportional costs: code bits, a per-row fp16 codebook (16 * 2**b) and a constant
    (scale + row index), ``[C, K]`` int64."""
    c = np.asarray(cands)
    return n[:, None] * c[None, :] + 16 * 2 ** c[None, :] + 48


def assert_cost_budget(bits: np.ndarray, w: np.ndarray, n: np.ndarray, cands,
                       budget: float) -> None:
    """Never above the budget in exact integer arithmetic, and within one cost step of it."""
    used = int(w[np.arange(n.shape[0]), np.searchsorted(np.asarray(cands), bits)].sum())
    cap = Fraction(repr(budget)) * int(n.sum())
    assert used <= cap
    assert cap - used <= int(np.diff(w, axis=1).max())
