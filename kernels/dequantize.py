"""Dequantize the rows of one bit-width into their original rows of the output matrix.

``out[rows[i], j] = codebook[i, code[i, j]] * absmax[rows[i], j // group_size]``. Rows are stored
grouped by bit-width, so a full matrix is the union of one call per stored width.
``dequantize_ref`` is the pure-PyTorch reference (the CPU path and the test oracle);
``dequantize`` dispatches to the Triton kernel ``_dequantize_kernel`` (unpack → codebook lookup →
× absmax → scatter to the original rows, one pass) on CUDA or when forced. Both compute the product
in fp32 and round once to the output dtype, so the kernel is bit-exact with the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.autotune import autotune, configs
from kernels.layout import codes_per_word
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


@autotune(
    configs(
        [{"BLOCK_R": 8, "BLOCK_C": 64}, {"BLOCK_R": 4, "BLOCK_C": 512}, {"BLOCK_R": 8, "BLOCK_C": 256},
         {"BLOCK_R": 16, "BLOCK_C": 128}, {"BLOCK_R": 2, "BLOCK_C": 1024}, {"BLOCK_R": 1, "BLOCK_C": 2048}],
        num_warps=(4, 8),
    ),
    key=["n_rows", "in_features", "BITS"],
)
@triton.jit
def _dequantize_kernel(
    q_ptr, rows_ptr, cb_ptr, a_ptr, out_ptr, n_rows, in_features, group_size,
    stride_qr, stride_cbr, stride_ar, stride_ac, stride_or, stride_oc,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[rows[i], j] = codebook[i, code[i, j]] * absmax[rows[i], j // group_size]."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    i = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    col = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    i_ok = i < n_rows
    m = i_ok[:, None] & (col < in_features)[None, :]
    orig = tl.load(rows_ptr + i, mask=i_ok, other=0).to(tl.int64)
    word = tl.load(q_ptr + i[:, None] * stride_qr + (col // PER_WORD)[None, :], mask=m, other=0)
    code = (word >> ((col % PER_WORD) * BITS)[None, :]) & ((1 << BITS) - 1)
    value = tl.load(cb_ptr + i[:, None] * stride_cbr + code, mask=m, other=0.0).to(tl.float32)
    scale = tl.load(a_ptr + orig[:, None] * stride_ar + (col // group_size)[None, :] * stride_ac,
                    mask=m, other=0.0).to(tl.float32)
    y = value * scale
    tl.store(out_ptr + orig[:, None] * stride_or + col[None, :] * stride_oc,
             y.to(out_ptr.dtype.element_ty), mask=m)


def dequantize_triton(
    codes: torch.Tensor,
    rows: torch.Tensor,
    codebook: torch.Tensor,
    absmax: torch.Tensor,
    bits: int,
    group_size: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Triton launcher of ``dequantize_ref`` (same arguments, bit-exact result)."""
    n = codes.shape[0]
    if n == 0:
        return out
    in_features = out.shape[1]
    if codes.shape[1] * codes_per_word(bits) < in_features:
        raise ValueError(f"{codes.shape[1]} words per row cannot hold {in_features} {bits}-bit codes")
    if codebook.shape[-1] != 1 << bits or codebook.shape[0] not in (1, n):
        raise ValueError(f"codebook must be [{n} or 1, {1 << bits}], got {tuple(codebook.shape)}")
    if codes.stride(1) != 1:
        codes = codes.contiguous()
    if codebook.stride(1) != 1:
        codebook = codebook.contiguous()
    stride_cbr = 0 if codebook.shape[0] == 1 else codebook.stride(0)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_R"]), triton.cdiv(in_features, meta["BLOCK_C"]))

    _dequantize_kernel[grid](
        codes, rows, codebook, absmax, out, n, in_features, group_size,
        codes.stride(0), stride_cbr, absmax.stride(0), absmax.stride(1), out.stride(0), out.stride(1),
        BITS=bits, PER_WORD=codes_per_word(bits),
    )
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
    """Dispatching launcher: Triton on CUDA (or when forced), the C++ CPU backend on CPU
    (``kernels.cpu_backend``, bit-exact), the reference otherwise."""
    from kernels.dispatch import use_cpu, use_triton

    if use_triton(backend, codes):
        return dequantize_triton(codes, rows, codebook, absmax, bits, group_size, out)
    if use_cpu(backend, codes):
        from kernels.cpu_backend import dequantize_cpu

        return dequantize_cpu(codes, rows, codebook, absmax, bits, group_size, out)
    return dequantize_ref(codes, rows, codebook, absmax, bits, group_size, out)
