"""Fused LUT matmul with a quantized weight: ``y = x · deq(W)ᵀ`` and ``grad_x = grad_y · deq(W)``.

``W [out, in]`` is a ``lowra.format.QuantizedTensor`` (rows grouped by bit-width; see
``kernels.dequantize`` for the element formula). The Triton kernels dequantize W tiles in
registers (unpack → per-row codebook lookup → × group absmax → cast to the activation dtype) and
never write ``deq(W)`` to global memory:

* forward, decode shapes (M ≤ 16): ``_lut_gemv_kernel`` — a split-K GEMV (broadcast-multiply and
  reduce, fp32 accumulation, ``atomic_add`` into an fp32 ``y`` when split);
* forward, larger M: ``_lut_mm_kernel`` — a tiled ``tl.dot`` GEMM;
* backward: ``_lut_mm_t_kernel`` — a tiled ``tl.dot`` over the stored rows of one bit group,
  accumulating into an fp32 ``grad_x`` across groups.

One launch per stored bit-width: the forward writes the output columns ``y[:, rows_b]`` (scattered
by the original row index), the backward reads ``grad_y[:, rows_b]``. ``lut_matmul_ref`` /
``lut_matmul_backward_ref`` are the references (they materialize ``deq(W)`` in the activation
dtype transiently). ``LUTMatmulFunction`` is the autograd op: gradient for ``x`` only, the
dequantized weight is never kept between calls.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kernels.autotune import autotune, configs
from kernels.layout import codes_per_word

GEMV_MAX_M = 16  # forward rows M up to this run the GEMV kernel, larger M the tl.dot kernel
GEMV_TILE_BUDGET = 16384  # max BLOCK_M * BLOCK_N * BLOCK_K fp32 products per GEMV step (registers)


# ---------------------------------------------------------------------------------------- helpers
def weight_parts(qweight: Any) -> tuple[int, int, int, list, torch.Tensor]:
    """``(out, in, group_size, groups, absmax)`` of a ``QuantizedTensor`` (duck-typed).

    ``groups`` are objects with ``bits``, ``rows``, ``codes``, ``codebook``; ``absmax`` is the
    stored fp16 ``[out, groups]`` tensor (or the fp32 restore of a double-quantized one).
    """
    scales = qweight.scales
    if getattr(scales, "double_quant", False) or getattr(scales, "absmax", None) is None:
        absmax = scales.restore()
    else:
        absmax = scales.absmax
    out_features, in_features = qweight.shape
    return int(out_features), int(in_features), int(qweight.group_size), list(qweight.groups), absmax


def _dequant_weight(qweight: Any, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """``deq(W) [out, in]`` in ``dtype`` (fp32 product rounded once, like the kernels)."""
    return qweight.dequantize(dtype=dtype, backend=backend)


# ---------------------------------------------------------------------------------------- refs
def lut_matmul_ref(x: torch.Tensor, qweight: Any) -> torch.Tensor:
    """Reference forward: ``x [..., in] @ deq(W)ᵀ → [..., out]`` in ``x.dtype``."""
    w = _dequant_weight(qweight, x.dtype, "torch")
    return x @ w.t()


def lut_matmul_backward_ref(grad_y: torch.Tensor, qweight: Any) -> torch.Tensor:
    """Reference backward: ``grad_y [..., out] @ deq(W) → [..., in]`` in ``grad_y.dtype``."""
    w = _dequant_weight(qweight, grad_y.dtype, "torch")
    return grad_y @ w


# ---------------------------------------------------------------------------------------- kernels
@triton.jit
def _deq_tile(q_ptr, cb_ptr, a_ptr, i, orig, k, mask, group_size, stride_qr, stride_cbr,
              stride_ar, stride_ac, BITS: tl.constexpr, PER_WORD: tl.constexpr):
    """fp32 tile ``[len(i), len(k)]`` of deq(W) for stored rows ``i`` (original rows ``orig``)."""
    word = tl.load(q_ptr + i[:, None] * stride_qr + (k // PER_WORD)[None, :], mask=mask, other=0)
    code = (word >> ((k % PER_WORD) * BITS)[None, :]) & ((1 << BITS) - 1)
    value = tl.load(cb_ptr + i[:, None] * stride_cbr + code, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(a_ptr + orig[:, None] * stride_ar + (k // group_size)[None, :] * stride_ac,
                    mask=mask, other=0.0).to(tl.float32)
    return value * scale


def prune_gemv_configs(configs: list, named_args: dict, **kwargs: Any) -> list:
    """Drop GEMV configs whose [BLOCK_M, BLOCK_N, BLOCK_K] product tile exceeds the budget."""
    block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 1))
    keep = [c for c in configs if block_m * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= GEMV_TILE_BUDGET]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


@autotune(
    configs(
        [{"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2},
         {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 4}, {"BLOCK_N": 8, "BLOCK_K": 64, "SPLIT_K": 4},
         {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}, {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 8},
         {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1}, {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2},
         {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1}, {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4},
         {"BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 2}, {"BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 2},
         {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 8}],
        num_warps=(4, 8),
        num_stages=(2, 3),
    ),
    key=["M", "n_rows", "K", "BITS"],
    restore_value=["y_ptr"],  # y is shared by the launches of every bit group
    prune_configs_by={"early_config_prune": prune_gemv_configs},
)
@triton.jit
def _lut_gemv_kernel(
    x_ptr, q_ptr, rows_ptr, cb_ptr, a_ptr, y_ptr, M, n_rows, K, group_size,
    stride_xm, stride_xk, stride_qr, stride_cbr, stride_ar, stride_ac, stride_ym,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """y32[m, rows[i]] += Σ_k x[m, k] · deq(W)[i, k] over this program's K slices (M ≤ BLOCK_M)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    i = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    i_ok = i < n_rows
    orig = tl.load(rows_ptr + i, mask=i_ok, other=0).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xt = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :] * stride_xk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = _deq_tile(q_ptr, cb_ptr, a_ptr, i, orig, k, i_ok[:, None] & k_ok[None, :], group_size,
                      stride_qr, stride_cbr, stride_ar, stride_ac, BITS, PER_WORD)
        w = w.to(x_ptr.dtype.element_ty).to(tl.float32)
        acc += tl.sum(xt.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    ptrs = y_ptr + m[:, None] * stride_ym + orig[None, :]
    mask = m_ok[:, None] & i_ok[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc, mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


@autotune(
    configs(
        [{"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8},
         {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8},
         {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8},
         {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8},
         {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8},
         {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}],
        num_warps=(4, 8),
        num_stages=(3, 4),
    ),
    key=["M", "n_rows", "K", "BITS"],
)
@triton.jit
def _lut_mm_kernel(
    x_ptr, q_ptr, rows_ptr, cb_ptr, a_ptr, y_ptr, M, n_rows, K, group_size,
    stride_xm, stride_xk, stride_qr, stride_cbr, stride_ar, stride_ac, stride_ym, stride_yn,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[m, rows[i]] = Σ_k x[m, k] · deq(W)[i, k] for one [BLOCK_M, BLOCK_N] tile (tl.dot)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(n_rows, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    i = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = m < M
    i_ok = i < n_rows
    orig = tl.load(rows_ptr + i, mask=i_ok, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xt = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :] * stride_xk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = _deq_tile(q_ptr, cb_ptr, a_ptr, i, orig, k, i_ok[:, None] & k_ok[None, :], group_size,
                      stride_qr, stride_cbr, stride_ar, stride_ac, BITS, PER_WORD)
        acc = tl.dot(xt, tl.trans(w.to(x_ptr.dtype.element_ty)), acc, input_precision=DOT_PREC)
    tl.store(y_ptr + m[:, None] * stride_ym + orig[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & i_ok[None, :])


@autotune(
    configs(
        [{"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32},
         {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128},
         {"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 128},
         {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128},
         {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 256},
         {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64}],
        num_warps=(4, 8),
        num_stages=(3, 4),
    ),
    key=["M", "n_rows", "K", "BITS"],
    restore_value=["gx_ptr"],
)
@triton.jit
def _lut_mm_t_kernel(
    gy_ptr, q_ptr, rows_ptr, cb_ptr, a_ptr, gx_ptr, M, n_rows, K, group_size,
    stride_gm, stride_gn, stride_qr, stride_cbr, stride_ar, stride_ac, stride_xm,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, DOT_PREC: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """gx[m, k] (+)= Σ_i grad_y[m, rows[i]] · deq(W)[i, k] over the stored rows of one group."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = m < M
    k_ok = k < K
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, n_rows, BLOCK_N):
        i = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        i_ok = i < n_rows
        orig = tl.load(rows_ptr + i, mask=i_ok, other=0).to(tl.int64)
        gy = tl.load(gy_ptr + m[:, None] * stride_gm + orig[None, :] * stride_gn,
                     mask=m_ok[:, None] & i_ok[None, :], other=0.0)
        w = _deq_tile(q_ptr, cb_ptr, a_ptr, i, orig, k, i_ok[:, None] & k_ok[None, :], group_size,
                      stride_qr, stride_cbr, stride_ar, stride_ac, BITS, PER_WORD)
        acc = tl.dot(gy, w.to(gy_ptr.dtype.element_ty), acc, input_precision=DOT_PREC)
    ptrs = gx_ptr + m[:, None] * stride_xm + k[None, :]
    mask = m_ok[:, None] & k_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(gx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------- launchers
def _group_args(g: Any, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    codes = g.codes if g.codes.stride(-1) == 1 else g.codes.contiguous()
    codebook = g.codebook if g.codebook.stride(-1) == 1 else g.codebook.contiguous()
    stride_cbr = 0 if codebook.shape[0] == 1 else codebook.stride(0)
    return codes, g.rows, codebook, stride_cbr


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_activation(t: torch.Tensor, features: int, what: str) -> None:
    if t.shape[-1] != features:
        raise ValueError(f"{what} has {t.shape[-1]} features, the weight expects {features}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton LUT matmul runs fp32/fp16/bf16 activations, got {t.dtype}")


def lut_matmul_triton(x: torch.Tensor, qweight: Any) -> torch.Tensor:
    """Triton forward ``x [..., in] → y [..., out]`` (GEMV for M ≤ 16, tiled tl.dot otherwise)."""
    out_features, in_features, group_size, groups, absmax = weight_parts(qweight)
    _check_activation(x, in_features, "x")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*lead, out_features)
    if M <= GEMV_MAX_M:
        y = torch.zeros(M, out_features, dtype=torch.float32, device=x.device)
        block_m = max(1, triton.next_power_of_2(M))
        for g in groups:
            n = g.rows.numel()
            if n == 0:
                continue
            codes, rows, codebook, stride_cbr = _group_args(g, absmax)

            def grid(meta, n=n):
                return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

            _lut_gemv_kernel[grid](
                x2, codes, rows, codebook, absmax, y, M, n, in_features, group_size,
                x2.stride(0), x2.stride(1), codes.stride(0), stride_cbr, absmax.stride(0),
                absmax.stride(1), y.stride(0),
                BITS=g.bits, PER_WORD=codes_per_word(g.bits), BLOCK_M=block_m,
            )
        y = y.to(x.dtype)
    else:
        y = torch.empty(M, out_features, dtype=x.dtype, device=x.device)
        for g in groups:
            n = g.rows.numel()
            if n == 0:
                continue
            codes, rows, codebook, stride_cbr = _group_args(g, absmax)

            def grid(meta, n=n):
                return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

            _lut_mm_kernel[grid](
                x2, codes, rows, codebook, absmax, y, M, n, in_features, group_size,
                x2.stride(0), x2.stride(1), codes.stride(0), stride_cbr, absmax.stride(0),
                absmax.stride(1), y.stride(0), y.stride(1),
                BITS=g.bits, PER_WORD=codes_per_word(g.bits), DOT_PREC=_dot_precision(x.dtype),
            )
    return y.reshape(*lead, out_features)


def lut_matmul_backward_triton(grad_y: torch.Tensor, qweight: Any) -> torch.Tensor:
    """Triton backward ``grad_y [..., out] → grad_x [..., in]``, accumulated over bit groups."""
    out_features, in_features, group_size, groups, absmax = weight_parts(qweight)
    _check_activation(grad_y, out_features, "grad_y")
    lead = grad_y.shape[:-1]
    gy = grad_y.reshape(-1, out_features)
    M = gy.shape[0]
    live = [g for g in groups if g.rows.numel() > 0]
    if M == 0 or not live:
        return grad_y.new_zeros(*lead, in_features)
    direct = grad_y.dtype == torch.float32 or len(live) == 1
    gx = torch.empty(M, in_features, dtype=grad_y.dtype if direct else torch.float32,
                     device=grad_y.device)
    for j, g in enumerate(live):
        n = g.rows.numel()
        codes, rows, codebook, stride_cbr = _group_args(g, absmax)

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(in_features, meta["BLOCK_K"]))

        _lut_mm_t_kernel[grid](
            gy, codes, rows, codebook, absmax, gx, M, n, in_features, group_size,
            gy.stride(0), gy.stride(1), codes.stride(0), stride_cbr, absmax.stride(0),
            absmax.stride(1), gx.stride(0),
            BITS=g.bits, PER_WORD=codes_per_word(g.bits), DOT_PREC=_dot_precision(grad_y.dtype),
            ACCUMULATE=j > 0,
        )
    return gx.to(grad_y.dtype).reshape(*lead, in_features)


def lut_matmul(x: torch.Tensor, qweight: Any, backend: str = "auto") -> torch.Tensor:
    """Dispatching forward ``y = x · deq(W)ᵀ``: ``x [..., in]`` → ``[..., out]`` in ``x.dtype``.

    Not differentiable by itself: use ``LUTMatmulFunction.apply(x, qweight, backend)`` (or
    ``lut_linear``) inside autograd.
    """
    from kernels.dispatch import use_cpu, use_triton

    if use_triton(backend, x):
        return lut_matmul_triton(x, qweight)
    if use_cpu(backend, x):
        from kernels.cpu_backend import lut_matmul_cpu

        return lut_matmul_cpu(x, qweight)
    return lut_matmul_ref(x, qweight)


def lut_matmul_backward(grad_y: torch.Tensor, qweight: Any, backend: str = "auto") -> torch.Tensor:
    """Dispatching backward ``grad_x = grad_y · deq(W)``: ``[..., out]`` → ``[..., in]``."""
    from kernels.dispatch import use_cpu, use_triton

    if use_triton(backend, grad_y):
        return lut_matmul_backward_triton(grad_y, qweight)
    if use_cpu(backend, grad_y):
        from kernels.cpu_backend import lut_matmul_backward_cpu

        return lut_matmul_backward_cpu(grad_y, qweight)
    return lut_matmul_backward_ref(grad_y, qweight)


class LUTMatmulFunction(torch.autograd.Function):
    """``y = x · deq(W)ᵀ`` with a frozen quantized ``W``: gradient for ``x`` only.

    Only a reference to the (already stored) quantized weight is kept for backward; ``deq(W)`` is
    recomputed tile by tile (Triton) or transiently (reference) and never kept between calls.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, qweight: Any, backend: str = "auto") -> torch.Tensor:
        ctx.qweight = qweight
        ctx.backend = backend
        return lut_matmul(x, qweight, backend)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = lut_matmul_backward(grad_y.contiguous(), ctx.qweight, ctx.backend)
        return grad_x, None, None


def lut_linear(x: torch.Tensor, qweight: Any, backend: str = "auto") -> torch.Tensor:
    """Differentiable ``x · deq(W)ᵀ`` (``LUTMatmulFunction.apply``)."""
    return LUTMatmulFunction.apply(x, qweight, backend)
