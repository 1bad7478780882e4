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

``codebook_grad_ref`` is the pure-PyTorch reference; ``codebook_grad_triton`` the kernel's launcher;
``codebook_grad_cpu`` the CPU path (the C++ extension's ``table_grad_group``: per chunk of original rows
one BLAS product ``∂L/∂W[chunk] = grad_outᵀ x`` shared by every width, then one pass over the packed
codes gives the code sums and the group sums together); ``codebook_grad`` dispatches one width and
``layer_table_grads`` a whole layer (what ``lowra::lut_linear``'s backward calls).
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


def codebook_grad_cpu(
    grad_out: torch.Tensor, x: torch.Tensor, codes: list[torch.Tensor], rows: list[torch.Tensor],
    codebooks: list[torch.Tensor], absmax: torch.Tensor, bits: list[int], group_size: int, need_cb: list[bool],
    need_scales: bool, row_chunk: int | None = None,
) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """The widths of one layer on the C++ CPU backend (``table_grad_group``).

    Per width, ``∂L/∂W`` is built for ``row_chunk`` of its stored rows at a time (``grad_out[:, rows]ᵀ x``,
    ``[chunk, in]`` fp32, ≤ ``CHUNK_ELEMENTS``) and folded into the rows' code sums and group sums in one
    pass over the packed codes (per group: ``loc[c] = Σ_{code = c} G``; ``∂cb[c] += a · loc[c]``,
    ``∂a = Σ_c cb[c] · loc[c]``). A width with neither gradient wanted is skipped.

    Args: as ``codebook_grad_ref``, one ``codes`` / ``rows`` / ``codebooks`` / ``bits`` entry per width;
    ``need_cb[j]``: width ``j``'s codebook gradient is wanted.
    Returns ``([∂L/∂codebook_j or None], ∂L/∂absmax [out, groups] or None)``, fp32 (rows of skipped
    widths zero).
    """
    from lowra_kernels.cpu_backend import _require, _scales, _table

    ext = _require()
    out_features, in_features = grad_out.shape[1], x.shape[1]
    for j, b in enumerate(bits):
        _check(grad_out, x, codes[j], rows[j], codebooks[j], absmax, b, group_size)
    go = grad_out.to(torch.float32)
    xa = x.to(torch.float32).contiguous()
    a = _scales(absmax)
    g_a = torch.zeros((out_features, num_groups(in_features, group_size)), dtype=torch.float32) if need_scales \
        else None
    step = row_chunk or max(1, CHUNK_ELEMENTS // max(1, in_features))
    g_cbs: list[torch.Tensor | None] = []
    for j, b in enumerate(bits):
        n = codes[j].shape[0]
        if not (need_cb[j] or need_scales) or n == 0:
            g_cbs.append(torch.zeros(codebooks[j].shape, dtype=torch.float32) if need_cb[j] else None)
            continue
        c, r = codes[j].contiguous(), rows[j].to(torch.int64).contiguous()
        t = _table(codebooks[j], b) if need_scales else a  # the table is read for ∂absmax only (else a dummy)
        g = torch.zeros((n, 1 << b), dtype=torch.float32) if need_cb[j] else None
        args = (c.data_ptr(), n, c.shape[1], r.data_ptr(), t.data_ptr(), codebooks[j].shape[0] == 1, a.data_ptr(),
                a.dtype == torch.float16, a.shape[1], b, group_size, in_features)
        for s in range(0, n, step):
            e = min(n, s + step)
            grad_w = torch.index_select(go, 1, r[s:e]).t() @ xa  # [chunk, in]: the only ∂L/∂W rows alive
            ext.table_grad_group(*args, grad_w.data_ptr(), s, e, grad_w.stride(0), 0 if g is None else g.data_ptr(),
                                 0 if g_a is None else g_a.data_ptr())
        g_cbs.append(None if g is None else g.sum(0, keepdim=True) if codebooks[j].shape[0] == 1 else g)
    return g_cbs, g_a


def row_sums(grad_out: torch.Tensor, x: torch.Tensor, absmax: torch.Tensor, group_size: int) -> torch.Tensor:
    """``Q[r] = Σ_g a[r, g] · (grad_outᵀ xs)[r, g]`` ``[out]`` (``xs [M, groups]``: the group sums of ``x``):
    the gradient of adding the same constant to every entry of row ``r``'s codebook. A
    ``[out, M] × [M, groups]`` product: ``group_size``× fewer flops than ``∂L/∂W``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    in_features = x.shape[1]
    groups = num_groups(in_features, group_size)
    xa = x.to(acc)
    if groups * group_size != in_features:
        xa = torch.nn.functional.pad(xa, (0, groups * group_size - in_features))
    xs = xa.reshape(-1, groups, group_size).sum(-1)
    # [groups, M] × [M, out]: BLAS is fast on this orientation, slow (narrow N) on grad_outᵀ xs
    return ((xs.t() @ grad_out.to(acc)) * absmax.to(acc).t()).sum(0)


def output_row_dot(grad_out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``Σ_m grad_out[m, r] · y[m, r]`` ``[out]`` in float64 (``grad_out``, ``y``: ``[M, out]``): the C++
    extension's ``col_dot`` (one pass, fp64 accumulators) for fp32 CPU tensors, else ``vecdot``."""
    from lowra_kernels.dispatch import use_cpu

    if (grad_out.dtype == y.dtype == torch.float32 and use_cpu("auto", y)):
        from lowra_kernels.cpu_backend import _require

        a, b = grad_out.contiguous(), y.contiguous()
        p = torch.empty(a.shape[1], dtype=torch.float64)
        _require().col_dot(a.data_ptr(), b.data_ptr(), a.shape[0], a.shape[1], p.data_ptr())
        return p
    return torch.linalg.vecdot(grad_out.to(torch.float64), y.to(torch.float64), dim=0)


def one_bit_codebook_grad(base_dot: torch.Tensor, q: torch.Tensor, rows: torch.Tensor,
                          codebook: torch.Tensor) -> torch.Tensor:
    """∂L/∂codebook of 1-bit rows without ``∂L/∂W``.

    A 1-bit row's weight is ``W_r = cb0 · S0 + cb1 · S1`` with ``S_c[k] = a[r, k // g] · [code_k = c]``, so
    its gradients are ``g_c = Σ_m grad_out[m, r] · (x S_cᵀ)[m]``, and two per-row sums give both:
    ``P[r] = Σ_m grad_out[m, r] · (x Wᵀ)[m, r] = cb0 g0 + cb1 g1`` (``base_dot``: the gradient of scaling
    the row, one pass over the base output) and ``Q = g0 + g1`` (``row_sums``); hence
    ``g1 = (P − cb0 Q) / (cb1 − cb0)``, ``g0 = Q − g1``. The rows must have ``cb1 ≠ cb0``
    (``layer_table_grads`` sends the others to the exact path).

    Args: base_dot, q: ``[out]`` (all rows of the layer); rows: ``[n]`` the 1-bit rows; codebook:
    ``[n or 1, 2]``. Returns ``[n or 1, 2]`` in ``q``'s dtype (a shared table gets the sum over rows).
    """
    r = rows.to(torch.long)
    p_r, q_r = base_dot.to(q.dtype)[r], q[r]
    cb = codebook.to(q.dtype).expand(r.shape[0], 2)
    g1 = (p_r - cb[:, 0] * q_r) / (cb[:, 1] - cb[:, 0])
    g = torch.stack([q_r - g1, g1], 1)
    return g.sum(0, keepdim=True) if codebook.shape[0] == 1 else g


#: a 1-bit row takes ``one_bit_codebook_grad`` when ``max(|cb0|, |cb1|) < ONE_BIT_MAX_RATIO · |cb1 − cb0|``
#: (the rounding error of ``base_dot`` is amplified by at most this ratio); other rows take the exact path.
ONE_BIT_MAX_RATIO = 1e3


def codebook_grad(
    grad_out: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, rows: torch.Tensor, codebook: torch.Tensor,
    absmax: torch.Tensor, bits: int, group_size: int, need_scales: bool = True, backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatching launcher of one width: the Triton kernel on CUDA (or ``backend="triton"``), the C++
    CPU backend for CPU tensors below float64 when it builds (``"auto"``) or always (``"cpu"``), else
    the chunked reference (``"torch"``, float64)."""
    from lowra_kernels.dispatch import resolve

    kind = resolve(backend, codes)
    if kind == "triton":
        return codebook_grad_triton(grad_out, x, codes, rows, codebook, absmax, bits, group_size, need_scales)
    if kind == "cpu" and x.dtype != torch.float64:
        g_cbs, g_a = codebook_grad_cpu(grad_out, x, [codes], [rows], [codebook], absmax, [bits], group_size,
                                       [True], need_scales)
        return g_cbs[0], None if g_a is None else g_a[rows.long()]
    return codebook_grad_ref(grad_out, x, codes, rows, codebook, absmax, bits, group_size, need_scales)


def _one_bit(base_dot: torch.Tensor, q: torch.Tensor, rows: torch.Tensor, codebook: torch.Tensor,
             kind: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(rows the closed form holds for — None when all —, ∂L/∂codebook)`` of one 1-bit width: the C++
    ``one_bit_grad`` on the CPU backend, ``one_bit_codebook_grad`` elsewhere (``[n, 2]`` per row; a
    shared table's sum only when every row qualifies, which for one table means all or none)."""
    n = rows.shape[0]
    if kind == "cpu":
        from lowra_kernels.cpu_backend import _require

        cb = codebook if codebook.dtype in (torch.float16, torch.float32) else codebook.float()
        cb, r = cb.contiguous(), rows.to(torch.int64).contiguous()
        p, qq = base_dot.to(torch.float64).contiguous(), q.to(torch.float64).contiguous()
        g = torch.empty((n, 2), dtype=torch.float32)
        bad = torch.empty(n, dtype=torch.uint8)
        nbad = _require().one_bit_grad(n, r.data_ptr(), cb.data_ptr(), cb.dtype == torch.float16,
                                       0 if cb.shape[0] == 1 else cb.stride(0), p.data_ptr(), qq.data_ptr(),
                                       ONE_BIT_MAX_RATIO, g.data_ptr(), bad.data_ptr())
        if nbad == 0:
            return None, g.sum(0, keepdim=True) if codebook.shape[0] == 1 else g
        return bad == 0, g
    cbf = codebook.to(torch.float32)
    ok = ONE_BIT_MAX_RATIO * (cbf[:, 1] - cbf[:, 0]).abs() > cbf.abs().amax(1)  # strict: cb0 = cb1 = 0 is out
    if bool(ok.all()):
        return None, one_bit_codebook_grad(base_dot, q, rows, codebook)
    ok = ok.expand(n)
    g = torch.zeros((n, 2), dtype=q.dtype, device=q.device)
    if codebook.shape[0] > 1 and bool(ok.any()):
        g[ok] = one_bit_codebook_grad(base_dot, q, rows[ok], codebook[ok])
    return ok, g


def layer_table_grads(
    grad_out: torch.Tensor, x: torch.Tensor, codes: list[torch.Tensor], rows: list[torch.Tensor],
    codebooks: list[torch.Tensor], absmax: torch.Tensor, bits: list[int], group_size: int, need_cb: list[bool],
    need_scales: bool, backend: str = "auto", base_dot: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """The codebook gradients of every stored width of one layer and the absmax gradient ``[out, groups]``
    (``lowra::lut_linear``'s backward).

    With ``base_dot`` (``[out]``: ``Σ_m grad_out[m, r] · (x deq(W)ᵀ)[m, r]``, from the forward's output), no
    scale gradient wanted and a backend other than the reference (``"torch"``), 1-bit rows take
    ``one_bit_codebook_grad`` (no ``∂L/∂W``);
    every other row builds ``∂L/∂W`` in chunks: ``codebook_grad_cpu`` on the CPU backend,
    ``codebook_grad`` per width elsewhere. fp32 results (float64 for float64 ``x`` on the reference).
    """
    from lowra_kernels.dispatch import resolve

    kind = resolve(backend, absmax)
    n_w = len(bits)
    fast: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}  # width → (rows it took or None = all, grads)
    sub_rows, sub_codes, sub_books = list(rows), list(codes), list(codebooks)
    q: torch.Tensor | None = None
    if base_dot is not None and not need_scales and kind != "torch":
        for j, b in enumerate(bits):
            if b != 1 or not need_cb[j] or codes[j].shape[0] == 0:
                continue
            if q is None:
                q = row_sums(grad_out, x, absmax, group_size)
            ok, g = _one_bit(base_dot, q, rows[j], codebooks[j], kind)
            if ok is None:
                fast[j] = (None, g)
            elif codebooks[j].shape[0] > 1 and bool(ok.any()):  # degenerate rows take the exact path
                fast[j] = (ok, g[ok])
                sub_rows[j], sub_codes[j], sub_books[j] = rows[j][~ok], codes[j][~ok], codebooks[j][~ok]
    exact = [need_cb[j] and (j not in fast or fast[j][0] is not None) for j in range(n_w)]
    if kind == "cpu" and x.dtype != torch.float64:
        g_cbs, g_a = codebook_grad_cpu(grad_out, x, sub_codes, sub_rows, sub_books, absmax, bits, group_size,
                                       exact, need_scales)
    else:
        g_a = torch.zeros(absmax.shape, dtype=torch.float32, device=absmax.device) if need_scales else None
        g_cbs = []
        for j, b in enumerate(bits):
            if not (exact[j] or need_scales) or sub_rows[j].shape[0] == 0:
                g_cbs.append(torch.zeros(sub_books[j].shape, dtype=torch.float32, device=x.device)
                             if exact[j] else None)
                continue
            g_cb, g_rows = codebook_grad(grad_out, x, sub_codes[j], sub_rows[j], sub_books[j], absmax, b,
                                         group_size, need_scales, backend)
            g_cbs.append(g_cb if exact[j] else None)
            if g_rows is not None:
                g_a[sub_rows[j].long()] = g_rows.float()
    out: list[torch.Tensor | None] = []
    for j in range(n_w):
        if j not in fast:
            out.append(g_cbs[j] if need_cb[j] else None)
            continue
        ok, g_fast = fast[j]
        if ok is None:
            out.append(g_fast)
            continue
        g = torch.empty(codebooks[j].shape, dtype=g_fast.dtype, device=g_fast.device)
        g[ok], g[~ok] = g_fast, g_cbs[j].to(g.dtype)
        out.append(g)
    return out, g_a
