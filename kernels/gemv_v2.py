"""GEMV v2 (M ≤ 4) on layout v2: ``y[m, rows[i]] = Σ_k x[m, k] · codebook[i, code[i, k]] · scale[k // G, i]``.

One program takes ``BLOCK_N`` rows and a contiguous range of K tiles (split-K); per tile it loads
each row's tile words as whole 16-byte vectors (rows interleaved: a warp reads ≥ 512 contiguous
bytes), unpacks by constant shifts, looks codes up in the row's **unscaled** codebook — built once
per program: 1–2 bits a register select tree (``lut_v2.select``), 3–4 bits a transposed table
looked up by ``tl.gather`` (``lut_v2.gather_lookup``) — multiplies by x in fp32, sums each (row,
scale group) and applies the group scale to that fp32 partial sum (one rounding fewer than scaling
each product in the activation dtype). ``EVEN_K`` (K a multiple of the tile) drops the x masks.
Partials go to a workspace ``[SPLIT_K, M, out]`` summed in a fixed order (deterministic).

``gemv_v2_ref`` is the reference: ``x @ deq(W)ᵀ`` with ``deq`` in fp32 from the v2 group (no
rounding of the weight), so the kernel matches it up to fp32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowra_kernels.layout_v2 import TILE, V2Group, unpack_tiles
from lowra_kernels.lut_v2 import chunk_codes, chunk_words, gather_lookup, gather_table, leaves, select

GEMV_V2_MAX_M = 4
# (BLOCK_N at M = 1, num_warps) per bit-width: tiles of BLOCK_N · 128 codes; M = 2 and 4 halve and
# quarter BLOCK_N (at least 8) so that the fp32 tile stays ≤ 96 registers (sm_90 SASS, no spills)
GEMV_V2_CONFIG = {1: (32, 4), 2: (32, 4), 3: (16, 4), 4: (16, 4)}


def gemv_v2_block_m(m: int) -> int:
    """The GEMV's M tile for ``m ≤ 4`` activation rows: 1, 2 or 4."""
    return 1 if m <= 1 else (2 if m <= 2 else 4)


def gemv_v2_block_n(bits: int, block_m: int) -> int:
    """Rows per program: ``GEMV_V2_CONFIG``'s M = 1 value over the M tile, at least 8."""
    return max(8, GEMV_V2_CONFIG[bits][0] // block_m)
GEMV_V2_MAXNREG = 96  # left alone, ptxas stops at 72 registers and spills 8 B (1 bit, M = 4, fp16/bf16, sm_90)
TARGET_PROGRAMS = 132 * 8  # split K until the grid holds about 8 programs per SM of an H100/H200


def gemv_v2_ref(x: torch.Tensor, g: V2Group, out_features: int) -> torch.Tensor:
    """``x [M, in] → [M, out]`` (fp32) for the rows of one v2 group (other outputs 0)."""
    idx = unpack_tiles(g.codes, g.bits)[:, :g.in_features]
    table = g.codebook.to(torch.float32)
    values = table[0][idx] if table.shape[0] == 1 else torch.gather(table, 1, idx)
    w = values * g.scales.t().to(torch.float32).repeat_interleave(g.group_size, dim=1)[:, :g.in_features]
    y = torch.zeros(x.shape[0], out_features, dtype=torch.float32, device=x.device)
    y[:, g.rows.to(torch.long)] = x.to(torch.float32) @ w.t()
    return y


@triton.jit
def _gemv_v2_kernel(
    x_ptr, q_ptr, cb_ptr, s_ptr, rows_ptr, ws_ptr, M, n_rows, K, tiles, tiles_per_split,
    stride_xm, stride_qt, stride_cbr, stride_sg, stride_ws_s, stride_ws_m,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """ws[pid_k, m, rows[i]] = Σ over this program's K tiles of x[m, k] · deq(W)[i, k].

    A tile is ``GT`` chunks of one scale group each (``[BLOCK_N, WPG, CPW]`` codes); products
    accumulate in a ``[BLOCK_M, BLOCK_N, WPG, CPW]`` fp32 tile reduced once after the loop.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = r < n_rows
    CPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS  # codes per (low-plane) word
    GT: tl.constexpr = 128 // GROUP if GROUP < 128 else 1  # scale groups per tile
    CPG: tl.constexpr = 128 // GT  # codes of one tile per scale group
    WPG: tl.constexpr = CPG // CPW if CPG >= CPW else 1
    if BITS <= 2:
        e0, e1, e2, e3 = leaves(cb_ptr, r, r_ok, stride_cbr, BITS)
    else:
        table = gather_table(cb_ptr, r, r_ok, stride_cbr, BITS, BLOCK_N)
    r2 = r[:, None]
    r_ok2 = r_ok[:, None]
    shift = (tl.arange(0, CPW) * BITS)[None, None, :]
    m4 = tl.arange(0, BLOCK_M)[:, None, None, None]
    wk = (tl.arange(0, WPG)[:, None] * CPW + tl.arange(0, CPW)[None, :])[None, None, :, :]  # [1, 1, WPG, CPW]
    acc = tl.zeros([BLOCK_M, BLOCK_N, WPG, CPW], dtype=tl.float32)
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tiles)
    for t in range(t0, t1):
        q_tile = q_ptr + t * stride_qt
        for h in tl.static_range(GT):
            g = (t * 128 + h * CPG) // GROUP
            g_ok = (tl.zeros_like(r2) + g * GROUP) < K  # the last tile may reach past the last group
            sc = tl.load(s_ptr + g * stride_sg + r2, mask=r_ok2 & g_ok, other=0.0).to(tl.float32)  # [BLOCK_N, 1]
            if BITS <= 2:  # leaves × the chunk's group scale in fp32 (4 products per row, not one per code)
                word = chunk_words(q_tile, r, r_ok, h, BITS, WPG)  # [BLOCK_N, WPG, 1]
                v = select(word, shift, (e0 * sc)[:, :, None], (e1 * sc)[:, :, None], (e2 * sc)[:, :, None],
                           (e3 * sc)[:, :, None], BITS)
            else:
                codes = chunk_codes(q_tile, r, r_ok, h, BITS, WPG, CPW)  # [BLOCK_N, WPG, CPW]
                v = gather_lookup(table, codes, BLOCK_N, WPG, CPW) * sc[:, :, None]
            k = t * 128 + h * CPG + wk
            x_ptrs = tl.broadcast_to(x_ptr + m4 * stride_xm + k, [BLOCK_M, BLOCK_N, WPG, CPW])
            if EVEN_K:
                xt = tl.load(x_ptrs, mask=m4 < M, other=0.0)
            else:
                xt = tl.load(x_ptrs, mask=(m4 < M) & (k < K), other=0.0)
            acc += xt.to(tl.float32) * v[None, :, :, :]
    part = tl.sum(tl.sum(acc, axis=3), axis=2)  # [BLOCK_M, BLOCK_N]
    m = tl.arange(0, BLOCK_M)
    orig = tl.load(rows_ptr + r, mask=r_ok, other=0).to(tl.int64)
    tl.store(ws_ptr + pid_k * stride_ws_s + m[:, None] * stride_ws_m + orig[None, :], part,
             mask=(m < M)[:, None] & r_ok[None, :])


def gemv_v2_launch_shape(n_rows: int, tiles: int, bits: int, block_m: int = 1) -> tuple[int, int, int, int]:
    """``(BLOCK_N, num_warps, SPLIT_K, tiles per split)`` of a launch: split K into contiguous tile
    ranges until the grid holds about ``TARGET_PROGRAMS`` programs."""
    block_n, warps = gemv_v2_block_n(bits, block_m), GEMV_V2_CONFIG[bits][1]
    row_blocks = triton.cdiv(n_rows, block_n)
    split = max(1, min(tiles, TARGET_PROGRAMS // max(row_blocks, 1)))
    per = triton.cdiv(tiles, split)
    return block_n, warps, triton.cdiv(tiles, per), per


def gemv_v2(x: torch.Tensor, groups: list[V2Group], out_features: int) -> torch.Tensor:
    """``x [M ≤ 4, in] → y [M, out]`` in ``x.dtype`` for a weight stored as v2 bit groups (their rows
    together every output row; a row in no group gives 0)."""
    if x.dim() != 2 or x.shape[0] > GEMV_V2_MAX_M:
        raise ValueError(f"gemv_v2 takes x [M ≤ {GEMV_V2_MAX_M}, in], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"gemv_v2 runs fp32/fp16/bf16 activations, got {x.dtype}")
    for g in groups:
        if g.in_features != x.shape[1]:
            raise ValueError(f"x has {x.shape[1]} features, the weight expects {g.in_features}")
    x = x.contiguous()
    M, K = x.shape
    block_m = gemv_v2_block_m(M)
    shapes = [gemv_v2_launch_shape(g.n_rows, g.tiles, g.bits, block_m) for g in groups]
    n_split = max((s[2] for s in shapes), default=1)
    ws = torch.zeros(n_split, M, out_features, dtype=torch.float32, device=x.device)
    for g, (block_n, warps, split, per) in zip(groups, shapes):
        if g.n_rows == 0:
            continue
        stride_cbr = 0 if g.codebook.shape[0] == 1 else g.codebook.stride(0)
        _gemv_v2_kernel[(triton.cdiv(g.n_rows, block_n), split)](
            x, g.codes, g.codebook, g.scales, g.rows, ws, M, g.n_rows, K, g.tiles, per,
            x.stride(0), g.codes.stride(0), stride_cbr, g.scales.stride(0), ws.stride(0), ws.stride(1),
            BITS=g.bits, GROUP=g.group_size, BLOCK_M=block_m, BLOCK_N=block_n, EVEN_K=K % TILE == 0,
            num_warps=warps, num_stages=1, maxnreg=GEMV_V2_MAXNREG,
        )
    y = ws[0] if n_split == 1 else ws.sum(0)
    return y.to(x.dtype)
