"""LoftQ initialization for any quantizer: ``W ≈ deq(Q) + s · B @ A`` with ``s = alpha / r``.

Algorithm (LoftQ, Li et al. 2023, METHOD.md §4), T alternations starting from ``B A = 0``:

    Q_t        = quantize(W − s · B_{t−1} A_{t−1})
    R_t        = W − deq(Q_t)
    U Σ Vᵀ     = SVD(R_t), truncated to rank r
    B_t        = U √Σ / √s          [out, r]
    A_t        = √Σ Vᵀ / √s         [r, in]          (so s · B_t A_t = U Σ Vᵀ exactly)

PEFT's LoftQ utility omits the ``1/√s`` factors, which mis-scales the init whenever alpha ≠ r; here
the LoRA scale is accounted for. The quantizer is any callable ``[out, in] fp32 → QuantizedTensor``:
for LowRA it quantizes with the FIXED per-row codebooks and bit-widths of the precision plan (only
the group absmax is recomputed on ``W − s·BA``), so the plan's budget holds inside the loop.

Decision: the iterate with the smallest residual ``‖W − deq(Q) − s·BA‖²`` is returned (LoftQ
returns the last). Iterations are deterministic, so the returned residual never grows with T and is
never above the plain quantization error (iteration 1 already has ``‖R − R_r‖ ≤ ‖R‖``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lowra.format import QuantizedTensor
from lowra.validation import check_weight

QuantizeFn = Callable[[torch.Tensor], QuantizedTensor]

__all__ = ["LoftQResult", "loftq_init", "low_rank_factors"]


@dataclass
class LoftQResult:
    """Output of ``loftq_init``.

    Attributes:
        qweight: the quantized base of the returned iterate.
        lora_A: fp32 ``[r, in]`` or None (``iters == 0``: keep the standard LoRA init).
        lora_B: fp32 ``[out, r]`` or None (``iters == 0``).
        sse_quant: ``‖W − deq(quantize(W))‖²`` (plain quantization, no adapters).
        sse: ``‖W − deq(Q) − s·B A‖²`` of the returned init (= ``sse_quant`` when ``iters == 0``).
        history: residual SSE after each iteration (length ``iters``).
        best_iter: 1-based iteration returned (0 when ``iters == 0``).
    """

    qweight: QuantizedTensor
    lora_A: torch.Tensor | None
    lora_B: torch.Tensor | None
    sse_quant: float
    sse: float
    history: list[float] = field(default_factory=list)
    best_iter: int = 0


def low_rank_factors(residual: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-r factors of ``residual [out, in]``: ``scaling · B @ A`` = its best rank-r fit.

    Returns ``A [r, in]`` and ``B [out, r]`` in fp32.
    """
    U, S, Vh = torch.linalg.svd(residual.to(torch.float32), full_matrices=False)
    root = S[:rank].sqrt() / (scaling ** 0.5)
    return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]


def _sse(diff: torch.Tensor) -> float:
    return float(diff.to(torch.float64).pow(2).sum())


def loftq_init(
    weight: torch.Tensor,
    quantize_fn: QuantizeFn,
    rank: int,
    alpha: float,
    iters: int = 1,
    name: str = "weight",
) -> LoftQResult:
    """Quantize ``weight [out, in]`` and initialize LoRA factors on the quantization residual.

    Args:
        weight: the full-precision weight.
        quantize_fn: ``[out, in] fp32 → QuantizedTensor`` (fixed codebooks / bits for LowRA).
        rank: LoRA rank r (1 ≤ r ≤ min(out, in)).
        alpha: LoRA alpha; the scale ``s = alpha / r`` is folded into A and B.
        iters: T ≥ 0 alternations; 0 = plain quantization and the standard LoRA init.
        name: used in error messages (e.g. the layer name).
    """
    check_weight(weight, name)
    if isinstance(iters, bool) or int(iters) != iters or iters < 0:
        raise ValueError(f"loftq iters must be a non-negative integer, got {iters!r}")
    out_features, in_features = weight.shape
    if iters and not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"{name}: LoRA rank must lie in [1, {min(out_features, in_features)}], got {rank}")
    if iters and alpha <= 0:
        raise ValueError(f"{name}: LoRA alpha must be positive, got {alpha}")
    w = weight.detach().to(torch.float32)
    q0 = quantize_fn(w)
    residual = w - q0.dequantize(torch.float32)
    sse_quant = _sse(residual)
    if iters == 0:
        return LoftQResult(q0, None, None, sse_quant, sse_quant)

    scaling = alpha / rank
    best: LoftQResult | None = None
    history = []
    q = q0
    delta = None  # s · B @ A of the previous iterate
    for t in range(1, int(iters) + 1):
        if delta is not None:
            q = quantize_fn(w - delta)
            residual = w - q.dequantize(torch.float32)
        A, B = low_rank_factors(residual, rank, scaling)
        delta = scaling * (B @ A)
        sse = _sse(residual - delta)
        history.append(sse)
        if best is None or sse < best.sse:
            best = LoftQResult(q, A, B, sse_quant, sse, best_iter=t)
    best.history = history
    return best
