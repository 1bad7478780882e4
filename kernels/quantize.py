"""Quantize rows against per-row thresholds and pack the codes.

A weight row ``w`` with group absmax ``a`` (one per ``group_size`` inputs) is normalized to
``x = w / a`` (``x = 0`` where ``a == 0``); its code is the number of the row's thresholds strictly
below ``x`` (thresholds sorted ascending, ``2**b - 1`` of them). ``quantize_ref`` is the
pure-PyTorch reference (the CPU path and the test oracle).
"""

from __future__ import annotations

import torch

from kernels.pack import pack_ref


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


def quantize(
    weight: torch.Tensor,
    absmax: torch.Tensor,
    thresholds: torch.Tensor,
    bits: int,
    group_size: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Dispatching launcher: Triton on CUDA (or when forced), the reference otherwise."""
    from kernels.dispatch import use_triton

    if use_triton(backend, weight):
        raise NotImplementedError("the Triton quantize kernel is not implemented yet")
    return quantize_ref(weight, absmax, thresholds, bits, group_size)
