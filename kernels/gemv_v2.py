"""GEMV v2 (M ≤ 4) on layout v2: ``y[m, rows[i]] = Σ_k x[m, k] · codebook[i, code[i, k]] · scale[k // G, i]``.

One program takes ``BLOCK_N`` rows and a contiguous range of K tiles (split-K, in whole loop steps).
Every tensor of the K loop is ``[BLOCK_N, 16]`` in one layout: 16 word pairs of a row on lane bits
0–3, rows on lane bit 4, the warps and ``BLOCK_N / (2 · warps)`` register slots. Before the loop,
each row's **unscaled** codebook is put into the lanes of its half warp (``lut_shfl.lane_table``;
2 arrangements at 1–2 bits, 1 at 3–4) and the layout requirement checked (``rows_agree``: NaN if
violated). A loop step loads 32 (low-plane) words of each row (two per thread as one 8-byte vector),
then per code: one ``shfl.sync.idx`` lookup (the word shifted once per ``4 / BITS`` codes; the
shuffle ignores the bits above the code) and one FMA with x in fp32 — x read as aligned pairs and
widened once for all the thread's rows; each word pair's fp32 partial sum is multiplied by its group
scale once (one rounding fewer than scaling each product in the activation dtype). No shared
memory, no barrier in the loop (``tests/kernels/test_kernel_v2_sass.py`` checks the sm_90 SASS:
≤ 0.10 warp-instructions per weight at 2 bits, ≤ 0.15 at 4). Partials go to a workspace
``[SPLIT_K, M, out]`` summed in a fixed order (deterministic). Whole row blocks run without row
masks; the partial last block is a second launch (``ROW_MASK``).

``gemv_v2_ref`` is the reference: ``x @ deq(W)ᵀ`` with ``deq`` in fp32 from the v2 group (no
rounding of the weight), so the kernel matches it up to fp32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowra_kernels.dispatch import interpreting
from lowra_kernels.layout_v2 import TILE, V2Group, tile_words, unpack_tiles
from lowra_kernels.lut_shfl import LANE_WORDS, lane_id, lane_table, lookup, opaque_i32, rows_agree

GEMV_V2_MAX_M = 4
# (bits, activation dtype) → largest M tile without spills (sm_90 and sm_80: fp32 pairs of 4 rows spill)
GEMV_V2_MAX_BLOCK_M = {(2, torch.float32): 2, (3, torch.float32): 2}
# (BLOCK_N at M = 1, num_warps) per bit-width: BLOCK_N / (2 · num_warps) rows per thread share each
# converted activation; M = 2 and 4 halve and quarter BLOCK_N (at least 2 · num_warps) so that the
# accumulators stay ≤ 96 registers (sm_90 SASS, no spills)
GEMV_V2_CONFIG = {1: (64, 4), 2: (64, 4), 3: (64, 4), 4: (64, 4)}


def gemv_v2_block_m(m: int, bits: int = 2, dtype: torch.dtype = torch.bfloat16) -> int:
    """The GEMV's M tile for ``m ≤ 4`` activation rows: 1, 2 or 4 — at most 2 for 2–3 bits with fp32
    activations (4 spills: the fp32 pairs of 4 rows outgrow 96 registers); larger ``m`` runs in tiles."""
    tile = 1 if m <= 1 else (2 if m <= 2 else 4)
    return min(tile, GEMV_V2_MAX_BLOCK_M.get((bits, dtype), 4))


def gemv_v2_block_n(bits: int, block_m: int) -> int:
    """Rows per program: ``GEMV_V2_CONFIG``'s M = 1 value over the M tile, at least one row a thread
    (``2 · num_warps``)."""
    return max(2 * GEMV_V2_CONFIG[bits][1], GEMV_V2_CONFIG[bits][0] // block_m)


def gemv_v2_step_tiles(bits: int) -> int:
    """K tiles of one K-loop step: ``2 · LANE_WORDS`` (low-plane) words of each row."""
    return 2 * LANE_WORDS.value // (8 if bits == 3 else tile_words(bits))


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
    x_ptr, q_ptr, cb_ptr, s_ptr, rows_ptr, ws_ptr, M, n_rows, row0, K, tiles, tiles_per_split,
    stride_xm, stride_qt, stride_cbr, stride_sg, stride_ws_s, stride_ws_m,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_K: tl.constexpr, ROW_MASK: tl.constexpr, OPAQUE: tl.constexpr,
):
    """ws[pid_k, m, rows[i]] = Σ over this program's K tiles of x[m, k] · deq(W)[i, k], rows
    ``row0 + pid_n · BLOCK_N ..`` (``ROW_MASK``: some past ``n_rows``; else all valid, no row masks).

    Tensors of the K loop are ``[BLOCK_N, 16]``: 16 word pairs of a row along lane bits 0–3 (two
    consecutive words of one scale group a thread, loaded as one 8-byte vector and split in
    registers), rows on lane bit 4, the warps and the register slots (``BLOCK_N / (2 · warps)`` rows
    a thread). A step covers 32 (low-plane) words of each row (``STEP`` tiles). Per code: one shuffle
    lookup (``lut_shfl``) and one FMA, plus a shift per ``4 / BITS`` codes; x is read as pairs (16-bit)
    and widened once for all the thread's rows; each word pair's fp32 partial sum is multiplied by its
    group scale once. ``opaque_i32`` indices keep every load of the loop in that one layout.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    LW: tl.constexpr = 8 if BITS == 3 else 128 * BITS // 32  # (low-plane) words of a row's tile
    TW: tl.constexpr = 12 if BITS == 3 else LW  # words of a row's tile
    CPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS  # codes per (low-plane) word
    STEP: tl.constexpr = 2 * LANE_WORDS // LW  # tiles per loop step
    ARR: tl.constexpr = 1 if BITS >= 3 else 2  # lane-table arrangements (codes per shift; 4 at 1 bit spill)
    r = row0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if ROW_MASK:
        r_ok2 = (r < n_rows)[:, None]
    else:
        r_ok2 = tl.full([BLOCK_N, 1], 1, tl.int1)  # a constant mask: folded away
    r2 = r[:, None]  # [BLOCK_N, 1]
    rs2 = opaque_i32(r, OPAQUE)[:, None]  # the scales' row offsets: rows are contiguous there
    kp = opaque_i32(tl.arange(0, LANE_WORDS), OPAQUE)[None, :]  # [1, 16] word pair of the step
    t_in = (2 * kp) // LW
    w_in = (2 * kp) % LW  # even: a pair never straddles a tile
    lane = lane_id(r2 + kp, OPAQUE)
    tab0 = rows_agree(lane_table(cb_ptr, r2, r_ok2, stride_cbr, lane, BITS, 0, OPAQUE), r2, lane, OPAQUE)
    tab1 = tab0
    tab2 = tab0
    tab3 = tab0
    if ARR > 1:
        tab1 = lane_table(cb_ptr, r2, r_ok2, stride_cbr, lane, BITS, 1, OPAQUE)
    if ARR > 2:
        tab2 = lane_table(cb_ptr, r2, r_ok2, stride_cbr, lane, BITS, 2, OPAQUE)
        tab3 = lane_table(cb_ptr, r2, r_ok2, stride_cbr, lane, BITS, 3, OPAQUE)
    acc0 = tl.zeros([BLOCK_N, LANE_WORDS], dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tiles)
    g_last = (K - 1) // GROUP
    two = tl.arange(0, 2)[None, None, :]
    m_ok1 = (kp * 0 + M) > 1  # [1, 16]: activation rows 1-3 exist (tensors: the interpreter masks need them)
    m_ok2 = (kp * 0 + M) > 2
    m_ok3 = (kp * 0 + M) > 3
    for ts in range(t0, t1, STEP):
        t = ts + t_in  # [1, 16]
        t_ok = t < t1
        tc = tl.minimum(t, t1 - 1)  # past the range: a valid tile, its x reads 0
        q_row = q_ptr + tc * stride_qt + r2 * TW  # [BLOCK_N, 16]
        pair = tl.load((q_row + w_in)[:, :, None] + two, mask=r_ok2[:, :, None], other=0)
        wa, wb = tl.split(pair)  # [BLOCK_N, 16] each: words w_in, w_in + 1
        if BITS == 3:
            hi = tl.load(q_row + 8 + w_in // 2, mask=r_ok2, other=0)  # bits 0-15: word w_in, 16-31: w_in + 1
        k0 = tc * 128 + w_in * CPW  # [1, 16] first code of word a
        sc = tl.load(s_ptr + tl.minimum(k0 // GROUP, g_last) * stride_sg + rs2, mask=r_ok2, other=0.0).to(tl.float32)
        p0 = tl.zeros([BLOCK_N, LANE_WORDS], dtype=tl.float32)
        p1 = p0
        p2 = p0
        p3 = p0
        for h in tl.static_range(2):
            if h == 0:
                word = wa
            else:
                word = wb
                if GROUP < 2 * CPW:  # 1 bit, groups of 32: the pair's words have their own scales
                    acc0 += p0 * sc
                    p0 = tl.zeros([BLOCK_N, LANE_WORDS], dtype=tl.float32)
                    if BLOCK_M > 1:
                        acc1 += p1 * sc
                        p1 = tl.zeros([BLOCK_N, LANE_WORDS], dtype=tl.float32)
                    if BLOCK_M > 2:
                        acc2 += p2 * sc
                        acc3 += p3 * sc
                        p2 = tl.zeros([BLOCK_N, LANE_WORDS], dtype=tl.float32)
                        p3 = tl.zeros([BLOCK_N, LANE_WORDS], dtype=tl.float32)
                    sc = tl.load(s_ptr + tl.minimum((k0 + CPW) // GROUP, g_last) * stride_sg + rs2, mask=r_ok2,
                                 other=0.0).to(tl.float32)
            for c in tl.static_range(CPW):
                if BITS == 3:
                    wm = ((word >> (2 * c)) & 3) | (((hi >> (16 * h + c)) & 1) << 2)
                    v = lookup(tab0, wm, cb_ptr, r2, r_ok2, stride_cbr, BITS, 0, OPAQUE)
                else:
                    if c % ARR == 0:
                        wm = word >> (c * BITS)
                    if c % ARR == 0:
                        v = lookup(tab0, wm, cb_ptr, r2, r_ok2, stride_cbr, BITS, 0, OPAQUE)
                    elif c % ARR == 1:
                        v = lookup(tab1, wm, cb_ptr, r2, r_ok2, stride_cbr, BITS, 1, OPAQUE)
                    elif c % ARR == 2:
                        v = lookup(tab2, wm, cb_ptr, r2, r_ok2, stride_cbr, BITS, 2, OPAQUE)
                    else:
                        v = lookup(tab3, wm, cb_ptr, r2, r_ok2, stride_cbr, BITS, 3, OPAQUE)
                k = k0 + h * CPW + c
                if EVEN_K:
                    x_ok = t_ok
                else:
                    x_ok = t_ok & (k < K)
                if c % 2 == 0:  # one load per activation pair
                    xr0 = x_raw(x_ptr, k, x_ok)
                    if BLOCK_M > 1:
                        xr1 = x_raw(x_ptr + stride_xm, k, x_ok & m_ok1)
                    if BLOCK_M > 2:
                        xr2 = x_raw(x_ptr + 2 * stride_xm, k, x_ok & m_ok2)
                        xr3 = x_raw(x_ptr + 3 * stride_xm, k, x_ok & m_ok3)
                p0 += v * x_f32(xr0, x_ptr, c % 2)
                if BLOCK_M > 1:
                    p1 += v * x_f32(xr1, x_ptr, c % 2)
                if BLOCK_M > 2:
                    p2 += v * x_f32(xr2, x_ptr, c % 2)
                    p3 += v * x_f32(xr3, x_ptr, c % 2)
        acc0 += p0 * sc
        if BLOCK_M > 1:
            acc1 += p1 * sc
        if BLOCK_M > 2:
            acc2 += p2 * sc
            acc3 += p3 * sc
    r_ok = r < n_rows
    orig = tl.load(rows_ptr + r, mask=r_ok, other=0).to(tl.int64)
    out = ws_ptr + pid_k * stride_ws_s + orig
    tl.store(out, tl.sum(acc0, axis=1), mask=r_ok)
    if BLOCK_M > 1:
        tl.store(out + stride_ws_m, tl.sum(acc1, axis=1), mask=r_ok & ((r * 0 + M) > 1))
    if BLOCK_M > 2:
        tl.store(out + 2 * stride_ws_m, tl.sum(acc2, axis=1), mask=r_ok & ((r * 0 + M) > 2))
        tl.store(out + 3 * stride_ws_m, tl.sum(acc3, axis=1), mask=r_ok & ((r * 0 + M) > 3))


@triton.jit
def x_raw(x_row, k, ok):
    """The activation pair ``(k, k + 1)`` (``k`` even) of one row as one integer load: int32 of two
    16-bit values, int64 of two fp32 values."""
    if x_row.dtype.element_ty == tl.float32:
        raw = tl.load(x_row.to(tl.pointer_type(tl.int64)) + (k >> 1), mask=ok, other=0)
    else:
        raw = tl.load(x_row.to(tl.pointer_type(tl.int32)) + (k >> 1), mask=ok, other=0)
    return raw


@triton.jit
def x_f32(raw, x_row, ODD: tl.constexpr):
    """Element ``ODD`` of ``x_raw``'s pair in fp32: bf16 by one bit operation, fp16 by one conversion,
    fp32 by a register move."""
    if x_row.dtype.element_ty == tl.float32:
        if ODD:
            v = (raw >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        else:
            v = raw.to(tl.int32).to(tl.float32, bitcast=True)
    elif x_row.dtype.element_ty == tl.bfloat16:
        if ODD:
            v = (raw & -65536).to(tl.float32, bitcast=True)
        else:
            v = (raw << 16).to(tl.float32, bitcast=True)
    else:
        if ODD:
            h = (raw >> 16).to(tl.int16)
        else:
            h = raw.to(tl.int16)
        v = h.to(tl.float16, bitcast=True).to(tl.float32)
    return v


def gemv_v2_launch_shape(n_rows: int, tiles: int, bits: int, block_m: int = 1) -> tuple[int, int, int, int]:
    """``(BLOCK_N, num_warps, SPLIT_K, tiles per split)`` of a launch: split K into contiguous tile
    ranges until the grid holds about ``TARGET_PROGRAMS`` programs."""
    block_n, warps = gemv_v2_block_n(bits, block_m), GEMV_V2_CONFIG[bits][1]
    row_blocks = triton.cdiv(n_rows, block_n)
    step = gemv_v2_step_tiles(bits)
    split = max(1, min(triton.cdiv(tiles, step), TARGET_PROGRAMS // max(row_blocks, 1)))
    per = triton.cdiv(triton.cdiv(tiles, split), step) * step  # whole steps: no masked step inside a range
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
    M, K = x.shape
    x = x.contiguous() if K % 2 == 0 else torch.nn.functional.pad(x, (0, 1))  # x is read as aligned pairs
    if x.data_ptr() % 8:
        x = x.clone()
    bms = [gemv_v2_block_m(M, g.bits, x.dtype) for g in groups]
    shapes = [gemv_v2_launch_shape(g.n_rows, g.tiles, g.bits, bm) for g, bm in zip(groups, bms)]
    n_split = max((s[2] for s in shapes), default=1)
    ws = torch.zeros(n_split, M, out_features, dtype=torch.float32, device=x.device)
    for g, bm, (block_n, warps, split, per) in zip(groups, bms, shapes):
        stride_cbr = 0 if g.codebook.shape[0] == 1 else g.codebook.stride(0)
        full = g.n_rows // block_n
        # whole row blocks without row masks, then the partial last block (if any) with them
        for row0, blocks, masked in ((0, full, False), (full * block_n, int(g.n_rows % block_n > 0), True)):
            for m0 in range(0, M if blocks else 0, bm):  # activation rows in tiles of bm
                _gemv_v2_kernel[(blocks, split)](
                    x[m0:], g.codes, g.codebook, g.scales, g.rows, ws[:, m0:], min(bm, M - m0), g.n_rows, row0, K,
                    g.tiles, per, x.stride(0), g.codes.stride(0), stride_cbr, g.scales.stride(0), ws.stride(0),
                    ws.stride(1), BITS=g.bits, GROUP=g.group_size, BLOCK_M=bm, BLOCK_N=block_n,
                    EVEN_K=K % TILE == 0, ROW_MASK=masked, OPAQUE=not interpreting(),
                    num_warps=warps, num_stages=1, maxnreg=GEMV_V2_MAXNREG,
                )
    y = ws[0] if n_split == 1 else ws.sum(0)
    return y.to(x.dtype)
