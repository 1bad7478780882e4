"""Quantize rows against per-row thresholds and pack the codes.

A weight row ``w`` with group absmax ``a`` (one per ``group_size`` inputs) is normalized to
``x = w / a`` (``x = 0`` where ``a == 0``); its code is the number of the row's thresholds strictly
below ``x`` (thresholds sorted ascending, ``2**b - 1`` of them). ``quantize_ref`` is the
pure-PyTorch reference (the CPU path and the test oracle); ``quantize`` dispatches to the fused
Triton kernel ``_quantize_kernel`` (normalize → threshold → pack, one pass) on CUDA or when forced.
The kernel divides with IEEE round-to-nearest (``div_rn``) so its codes are bit-exact with the
reference (``searchsorted`` puts NaN past the last threshold; so does the kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowra_kernels.autotune import autotune, configs
from lowra_kernels.layout import codes_per_word, words_per_row
from lowra_kernels.pack import pack_ref


def normalize_ref(weight: torch.Tensor, absmax: torch.Tensor, group_size: int) -> torch.Tensor:
    """``weight [rows, in]`` divided by its group absmax ``[rows, groups]`` (fp32; 0 where a == 0)."""
    in_features = weight.shape[1]
    scale = absmax.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :in_features]
    w = weight.to(torch.float32)
    return torch.where(scale > 0, w / torch.where(scale > 0, scale, 1.0), torch.zeros_like(w))


def codes_ref(normalized: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Codes ``[rows, in]`` = number of thresholds ``[rows or 1, 2**b - 1]`` strictly below x."""
    thr = thresholds.to(torch.float32)
    if thr.shape[0] == 1 and normalized.shape[0] != 1:
        thr = thr.expand(normalized.shape[0], -1)
    return torch.searchsorted(thr.contiguous(), normalized.contiguous(), right=False)


def quantize_ref(
    weight: torch.Tensor,
    absmax: torch.Tensor,
    thresholds: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Normalize, threshold and pack rows of one bit-width.

    Args:
        weight: ``[rows, in]`` rows that share the bit-width ``bits``.
        absmax: ``[rows, groups]`` stored group absmax of those rows (already fp16/dq-rounded).
        thresholds: ``[rows, 2**bits - 1]`` (or ``[1, …]`` shared) sorted ascending.
    Returns:
        int32 packed codes ``[rows, words_per_row(in, bits)]``.
    """
    if thresholds.shape[-1] != (1 << bits) - 1:
        raise ValueError(
            f"{bits}-bit quantization needs {(1 << bits) - 1} thresholds per row, "
            f"got {thresholds.shape[-1]}"
        )
    codes = codes_ref(normalize_ref(weight, absmax, group_size), thresholds)
    return pack_ref(codes, bits)


@autotune(
    configs([{"BLOCK_R": 16, "BLOCK_W": 16}, {"BLOCK_R": 32, "BLOCK_W": 8}], num_warps=(4,)),  # larger tiles spill
    key=["in_features", "BITS", "group_size"],  # not n_rows: it differs per bit group
)
@triton.jit
def _quantize_kernel(
    w_ptr, a_ptr, t_ptr, words_ptr, n_rows, in_features, n_words, group_size,
    stride_wr, stride_wc, stride_ar, stride_ac, stride_tr, stride_qr,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One [BLOCK_R, BLOCK_W] tile of packed words: normalize, count thresholds below, pack."""
    pid_r = tl.program_id(0)
    pid_w = tl.program_id(1)
    r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    r_ok = r < n_rows
    acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.int32)
    for s in tl.static_range(PER_WORD):
        col = w * PER_WORD + s
        m = r_ok[:, None] & (col < in_features)[None, :]
        x = tl.load(w_ptr + r[:, None] * stride_wr + col[None, :] * stride_wc, mask=m, other=0.0)
        a = tl.load(a_ptr + r[:, None] * stride_ar + (col // group_size)[None, :] * stride_ac,
                    mask=m, other=0.0)
        x = x.to(tl.float32)
        a = a.to(tl.float32)
        pos = a > 0
        x = tl.where(pos, tl.math.div_rn(x, tl.where(pos, a, 1.0)), 0.0)
        code = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.int32)
        for t in tl.static_range((1 << BITS) - 1):
            thr = tl.load(t_ptr + r * stride_tr + t, mask=r_ok, other=0.0).to(tl.float32)
            code += (thr[:, None] < x).to(tl.int32)
        code = tl.where(x != x, (1 << BITS) - 1, code)  # NaN sorts last (searchsorted)
        code = tl.where(m, code, 0)
        acc = acc | (code << (s * BITS))
    tl.store(words_ptr + r[:, None] * stride_qr + w[None, :], acc,
             mask=r_ok[:, None] & (w < n_words)[None, :])


def quantize_triton(
    weight: torch.Tensor,
    absmax: torch.Tensor,
    thresholds: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Triton launcher of ``quantize_ref`` (same arguments, bit-exact result)."""
    if thresholds.shape[-1] != (1 << bits) - 1:
        raise ValueError(
            f"{bits}-bit quantization needs {(1 << bits) - 1} thresholds per row, "
            f"got {thresholds.shape[-1]}"
        )
    rows, in_features = weight.shape
    per_word = codes_per_word(bits)
    n_words = words_per_row(in_features, bits)
    words = torch.empty(rows, n_words, dtype=torch.int32, device=weight.device)
    if rows == 0 or n_words == 0:
        return words
    if thresholds.shape[0] not in (1, rows):
        raise ValueError(f"thresholds must have 1 or {rows} rows, got {thresholds.shape[0]}")
    thr = thresholds.to(torch.float32).contiguous()
    stride_tr = 0 if thr.shape[0] == 1 else thr.stride(0)

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(n_words, meta["BLOCK_W"]))

    _quantize_kernel[grid](
        weight, absmax, thr, words, rows, in_features, n_words, group_size,
        weight.stride(0), weight.stride(1), absmax.stride(0), absmax.stride(1), stride_tr,
        words.stride(0),
        BITS=bits, PER_WORD=per_word,
    )
    return words


def quantize(
    weight: torch.Tensor,
    absmax: torch.Tensor,
    thresholds: torch.Tensor,
    bits: int,
    group_size: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Dispatching launcher: Triton on CUDA (or when forced), the reference otherwise."""
    from lowra_kernels.dispatch import use_triton

    if use_triton(backend, weight):
        return quantize_triton(weight, absmax, thresholds, bits, group_size)
    return quantize_ref(weight, absmax, thresholds, bits, group_size)
