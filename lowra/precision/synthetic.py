"""Synthetic error tables shaped like real ones (Llama-shaped, for tests and benchmarks)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

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
