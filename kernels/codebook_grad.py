"""Gradients of the loss with respect to the codebooks and the group scales of one bit-width's rows.

The dequantized weight (``dequantize_ref``) is ``W[r, k] = cb[i, code[i, k]] · a[r, k // group_size]``
for stored row ``i`` of original row ``r = rows[i]`` (``cb`` the fp16 codebook read as fp32, ``a``
the restored fp32 group absmax). The layer computes ``y = x Wᵀ``, so with ``G = ∂L/∂W = grad_outᵀ x``:

    ∂L/∂cb[i, c] = Σ_{k : code[i, k] = c} G[r, k] · a[r, k // group_size]     (a segment sum per row)
    ∂L/∂a[r, g]  = Σ_{k in group g}       G[r, k] · cb[i, code[i, k]]

(a codebook ``[1, 2**b]`` shared by all rows gets the sum over rows). The rounding of ``cb · a`` to
the compute dtype is taken as the identity (the straight-through convention every fp16 weight uses).
``G`` is never materialized for the whole layer: the reference builds it ``row_chunk`` rows at a
time (``[row_chunk, in]`` fp32, ≤ ``CHUNK_ELEMENTS``); the Triton kernel builds one
``[BLOCK_R, BLOCK_K]`` tile at a time in registers (``tl.dot`` over the tokens) and folds it into the
row's ``2**b`` code sums and its group sums before the next tile.

``codebook_grad_ref`` is the pure-PyTorch reference and the CPU path; ``codebook_grad_triton`` the
kernel's launcher; ``codebook_grad`` dispatches (Triton on CUDA or when forced, else the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowra_kernels.layout import codes_per_word, num_groups
from lowra_kernels.unpack import unpack_ref

CHUNK_ELEMENTS = 1 << 20  # elements of one [rows, in] chunk of ∂L/∂W in the reference (4 MiB fp32)


def _check(grad_out: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, rows: torch.Tensor,
           codebook: torch.Tensor, absmax: torch.Tensor, bits: int, group_size: int) -> None:
    n = codes.shape[0]
    if grad_out.dim() != 2 or x.dim() != 2 or grad_out.shape[0] != x.shape[0]:
        raise ValueError(f"grad_out [M, out] and x [M, in] must be 2-D with the same M, got "
                         f"{tuple(grad_out.shape)} and {tuple(x.shape)}")
    if codes.shape[1] * codes_per_word(bits) < x.shape[1]:
        raise ValueError(f"{codes.shape[1]} words per row cannot hold {x.shape[1]} {bits}-bit codes")
    if codebook.dim() != 2 or codebook.shape[1] != 1 << bits or codebook.shape[0] not in (1, n):
        raise ValueError(f"codebook must be [{n} or 1, {1 << bits}], got {tuple(codebook.shape)}")
    if rows.shape != (n,):
        raise ValueError(f"rows must be [{n}], got {tuple(rows.shape)}")
    if absmax.shape != (grad_out.shape[1], num_groups(x.shape[1], group_size)):
        raise ValueError(f"absmax must be [{grad_out.shape[1]}, {num_groups(x.shape[1], group_size)}], "
                         f"got {tuple(absmax.shape)}")


def codebook_grad_ref(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    codes: torch.Tensor,
    rows: torch.Tensor,
    codebook: torch.Tensor,
    absmax: torch.Tensor,
    bits: int,
    group_size: int,
    need_scales: bool = True,
    row_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(∂L/∂codebook, ∂L/∂absmax of these rows)`` for the ``n`` rows stored at ``bits`` bits.

    Args:
        grad_out: ``[M, out_features]`` gradient of the layer output (tokens flattened).
        x: ``[M, in_features]`` the layer input.
        codes: int32 ``[n, words]``; rows: ``[n]`` original row of each stored row.
        codebook: ``[n, 2**bits]`` or ``[1, 2**bits]`` (shared); absmax: ``[out_features, groups]``.
        need_scales: also return ``∂L/∂absmax[rows]`` ``[n, groups]`` (else None).
        row_chunk: rows of ``∂L/∂W`` built at once (default: ``CHUNK_ELEMENTS // in_features``).

    Returns fp32 tensors (float64 when ``x`` is float64): ``[n or 1, 2**bits]`` and ``[n, groups]``.
    """
    _check(grad_out, x, codes, rows, codebook, absmax, bits, group_size)
    n, in_features = codes.shape[0], x.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    go, xa = grad_out.to(acc), x.to(acc)
    n_groups = num_groups(in_features, group_size)
    g_cb = torch.zeros((codebook.shape[0], 1 << bits), dtype=acc, device=x.device)
    g_a = torch.zeros((n, n_groups), dtype=acc, device=x.device) if need_scales else None
    step = row_chunk or max(1, CHUNK_ELEMENTS // max(1, in_features))
    table = codebook.to(acc)
    for s in range(0, n, step):
        r = rows[s : s + step].to(torch.long)
        grad_w = go[:, r].t() @ xa  # [chunk, in]: the only ∂L/∂W rows alive at once
        idx = unpack_ref(codes[s : s + step], bits, in_features)
        scale = absmax[r].to(acc).repeat_interleave(group_size, dim=1)[:, :in_features]
        contrib = grad_w * scale
        if table.shape[0] == 1:
            g_cb[0].index_add_(0, idx.reshape(-1), contrib.reshape(-1))
        else:
            g_cb[s : s + step].scatter_add_(1, idx, contrib)
        if g_a is not None:
            values = table[0][idx] if table.shape[0] == 1 else torch.gather(table[s : s + step], 1, idx)
            prod = grad_w * values
            pad = n_groups * group_size - in_features
            g_a[s : s + step] = torch.nn.functional.pad(prod, (0, pad)).view(-1, n_groups, group_size).sum(-1)
    return g_cb, g_a


@triton.jit
def _codebook_grad_kernel(
    go_ptr, x_ptr, q_ptr, rows_ptr, cb_ptr, a_ptr, gcb_ptr, ga_ptr, M, n_rows, in_features,
    stride_gm, stride_go, stride_xm, stride_xk, stride_qr, stride_cbr, stride_ar, stride_ac,
    stride_gcbr, stride_gar,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, GROUP: tl.constexpr, SHARED: tl.constexpr,
    NEED_SCALES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One program: ``BLOCK_R`` stored rows; per K tile, ``G = grad_out[:, rows]ᵀ x[:, tile]`` by
    ``tl.dot`` over ``BLOCK_M`` tokens at a time, then the tile's code sums (one-hot over the
    ``2**BITS`` codes) and, with ``NEED_SCALES``, its group sums (``BLOCK_K`` divides ``GROUP``)."""
    pid = tl.program_id(0)
    N_CODES: tl.constexpr = 1 << BITS
    i = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    i_ok = i < n_rows
    orig = tl.load(rows_ptr + i, mask=i_ok, other=0).to(tl.int64)
    i64 = i.to(tl.int64)
    c3 = tl.arange(0, N_CODES)[None, None, :]
    acc_cb = tl.zeros((BLOCK_R, N_CODES), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < in_features
        grad_w = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            m_ok = m < M
            go = tl.load(go_ptr + m[:, None] * stride_gm + orig[None, :] * stride_go,
                         mask=m_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_R]
            xt = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :] * stride_xk,
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
            grad_w += tl.dot(tl.trans(go), xt, input_precision="ieee")
        ok = i_ok[:, None] & k_ok[None, :]
        word = tl.load(q_ptr + i64[:, None] * stride_qr + (k // PER_WORD)[None, :], mask=ok, other=0)
        code = (word >> ((k % PER_WORD) * BITS)[None, :]) & (N_CODES - 1)  # [BLOCK_R, BLOCK_K]
        scale = tl.load(a_ptr + orig * stride_ar + (k0 // GROUP) * stride_ac, mask=i_ok, other=0.0).to(tl.float32)
        contrib = tl.where(ok, grad_w * scale[:, None], 0.0)
        hit = code[:, :, None] == c3  # [BLOCK_R, BLOCK_K, N_CODES]
        acc_cb += tl.sum(tl.where(hit, contrib[:, :, None], 0.0), axis=1)
        if NEED_SCALES:
            values = tl.load(cb_ptr + i64[:, None] * stride_cbr + code, mask=ok, other=0.0).to(tl.float32)
            part = tl.sum(tl.where(ok, grad_w * values, 0.0), axis=1)
            ga = ga_ptr + i64 * stride_gar + k0 // GROUP
            tl.store(ga, tl.load(ga, mask=i_ok, other=0.0) + part, mask=i_ok)  # this program owns the row
    cc = tl.arange(0, N_CODES)[None, :]
    if SHARED:
        tl.atomic_add(gcb_ptr + tl.arange(0, N_CODES), tl.sum(acc_cb, axis=0))
    else:
        tl.store(gcb_ptr + i64[:, None] * stride_gcbr + cc, acc_cb, mask=i_ok[:, None])


def triton_block_k(group_size: int) -> int:
    """The kernel's K tile: ``min(group_size, 64)``; needs a power-of-two group of at least 16."""
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"the Triton codebook gradient needs a power-of-two group_size ≥ 16, got {group_size}; "
                         "use backend='torch' (the reference)")
    return min(group_size, 64)


def codebook_grad_triton(
    grad_out: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, rows: torch.Tensor, codebook: torch.Tensor,
    absmax: torch.Tensor, bits: int, group_size: int, need_scales: bool = True,
    block_r: int = 16, block_m: int = 32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton launcher of ``codebook_grad_ref`` (same arguments and results, fp32; sums in another order)."""
    block_k = triton_block_k(group_size)
    _check(grad_out, x, codes, rows, codebook, absmax, bits, group_size)
    n, in_features = codes.shape[0], x.shape[1]
    g_cb = torch.zeros((codebook.shape[0], 1 << bits), dtype=torch.float32, device=x.device)
    g_a = torch.zeros((n, num_groups(in_features, group_size)), dtype=torch.float32, device=x.device)
    if n == 0:
        return g_cb, g_a if need_scales else None
    codes, codebook = codes.contiguous(), codebook.contiguous()
    _codebook_grad_kernel[(triton.cdiv(n, block_r),)](
        grad_out, x, codes, rows, codebook, absmax, g_cb, g_a, x.shape[0], n, in_features,
        grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), codes.stride(0),
        0 if codebook.shape[0] == 1 else codebook.stride(0), absmax.stride(0), absmax.stride(1),
        g_cb.stride(0), g_a.stride(0),
        BITS=bits, PER_WORD=codes_per_word(bits), GROUP=group_size, SHARED=codebook.shape[0] == 1,
        NEED_SCALES=need_scales, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_M=block_m,
    )
    return g_cb, g_a if need_scales else None


def codebook_grad(
    grad_out: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, rows: torch.Tensor, codebook: torch.Tensor,
    absmax: torch.Tensor, bits: int, group_size: int, need_scales: bool = True, backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatching launcher: the Triton kernel on CUDA (or ``backend="triton"``), the chunked
    reference on CPU (``"auto"``, ``"torch"``, ``"cpu"``)."""
    from lowra_kernels.dispatch import use_triton

    if use_triton("torch" if backend == "cpu" else backend, codes):
        return codebook_grad_triton(grad_out, x, codes, rows, codebook, absmax, bits, group_size, need_scales)
    return codebook_grad_ref(grad_out, x, codes, rows, codebook, absmax, bits, group_size, need_scales)
