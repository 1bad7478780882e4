"""Dequantize the rows of one bit-width into their original rows of the output matrix.

``out[rows[i], j] = codebook[i, code[i, j]] * absmax[rows[i], j // group_size]``. Rows are stored
grouped by bit-width, so a full matrix is the union of one call per stored width.
``dequantize_ref`` is the pure-PyTorch reference (the CPU path and the test oracle).
"""

from __future__ import annotations

import torch

from kernels.unpack import unpack_ref


def dequantize_ref(
    codes: torch.Tensor,
    rows: torch.Tensor,
    codebook: torch.Tensor,
    absmax: torch.Tensor,
    bits: int,
    group_size: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write the dequantized rows of one bit-width into ``out`` and return it.

    Args:
        codes: int32 ``[n, words]`` packed codes of the ``n`` rows stored at ``bits`` bits.
        rows: ``[n]`` original row index of each stored row.
        codebook: ``[n, 2**bits]`` per-row mapping values, or ``[1, 2**bits]`` shared by all rows.
        absmax: ``[out_features, groups]`` group absmax of every row, in original row order.
        out: ``[out_features, in_features]`` output (any float dtype); rows not in ``rows`` are
            left untouched.
    """
    if codes.shape[0] == 0:
        return out
    in_features = out.shape[1]
    idx = unpack_ref(codes, bits, in_features)
    table = codebook.to(torch.float32)
    if table.shape[0] == 1:
        values = table[0][idx]
    else:
        values = torch.gather(table, 1, idx)
    rows = rows.to(torch.long)
    scale = absmax[rows].to(torch.float32).repeat_interleave(group_size, dim=1)[:, :in_features]
    out[rows] = (values * scale).to(out.dtype)
    return out


def dequantize(
    codes: torch.Tensor,
    rows: torch.Tensor,
    codebook: torch.Tensor,
    absmax: torch.Tensor,
    bits: int,
    group_size: int,
    out: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Dispatching launcher: Triton on CUDA (or when forced), the reference otherwise."""
    from kernels.dispatch import use_triton

    if use_triton(backend, codes):
        raise NotImplementedError("the Triton dequantize kernel is not implemented yet")
    return dequantize_ref(codes, rows, codebook, absmax, bits, group_size, out)
