"""Register lookup of per-row codebooks by warp shuffle, for the GEMV v2 K loop (no shared memory).

A row's ``2^b``-entry codebook lives in the registers of the warp's lanes (bitsandbytes' k-bit GEMV
idea): in a register "arrangement" ``a`` every lane ``L`` holds entry ``(L >> a·b) & (2^b − 1)`` of the
row that lane works on (``lane_table``). A code is looked up with one ``shfl.sync.idx`` whose source
lane keeps ``L``'s other lane bits and takes lane bits ``[a·b, a·b + b)`` from the code (``lookup``):
the shuffle reads only the lane-index bits outside its segment mask from the index operand, so the
code can sit anywhere above those bits — a 32-bit word shifted once serves ``4 / b`` codes (arrangements
at lane bits 0–3), no mask, no table in shared memory, no barrier.

Requirement (checked at run time by ``rows_agree``, and the kernel's result is NaN if it fails): in
every register slot, the 16 lanes of each half warp work on the same row — the kernels lay tensors
``[rows, 16 words]`` out with the 16 words on lane bits 0–3 (see ``gemv_v2``).

Under the Triton interpreter (no inline assembly) ``lookup`` reads the codebook from global memory
at the code — the value the shuffle returns when the requirement holds.
"""

from __future__ import annotations

import triton
import triton.language as tl

LANE_WORDS = tl.constexpr(16)  # words of a row along the lanes of a half warp (lane bits 0–3)


@triton.jit
def opaque_i32(v, OPAQUE: tl.constexpr):
    """``v`` (int32) through a move the compiler cannot see through (``OPAQUE``): index tensors built
    from it have no known contiguity, so every load of the K loop gets the same one-element-per-thread
    layout (words on the lanes) instead of per-load vector layouts that would need converting."""
    if OPAQUE:
        v = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1)
    return v


@triton.jit
def lane_id(like, OPAQUE: tl.constexpr):
    """The lane index (0–31) of the thread holding each element of ``like`` (int32, same shape);
    interpreted (no lanes, no inline assembly): zeros, unused."""
    if OPAQUE:
        lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True,
                                         pack=1)
    else:
        lane = like * 0
    return lane


@triton.jit
def _shfl_idx(v, idx, ctl):
    """``shfl.sync.idx.b32`` of fp32 ``v`` with lane operand ``idx`` and clamp/segment word ``ctl``."""
    return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, $3, 0xffffffff;", "=f,f,r,r",
                                     [v, idx, ctl], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def lane_table(cb_ptr, r2, r_ok2, stride_cbr, lane, BITS: tl.constexpr, A: tl.constexpr, OPAQUE: tl.constexpr):
    """Arrangement ``A`` of rows ``r2``'s codebooks (fp32, the shape of ``lane``): entry
    ``(lane >> A·BITS) & (2^BITS − 1)``. Interpreted: unused (``lookup`` reads the codebook), zeros."""
    if OPAQUE:
        e = (lane >> (A * BITS)) & ((1 << BITS) - 1)
        tab = tl.load(cb_ptr + r2 * stride_cbr + e, mask=r_ok2, other=0.0).to(tl.float32)
    else:
        tab = tl.zeros(lane.shape, dtype=tl.float32)
    return tab


@triton.jit
def rows_agree(tab, r2, lane, OPAQUE: tl.constexpr):
    """``tab``, or NaN in every register slot where the lanes of a half warp hold different rows (the
    layout requirement of ``lookup``; checked once per program, so a layout change can never give
    silently wrong numbers)."""
    if OPAQUE:
        rf = (r2 + tl.zeros_like(lane)).to(tl.float32)  # row indices < 2^24: exact in fp32
        lead = _shfl_idx(rf, lane * 0, lane * 0 + 0x101F)  # lane (L & 16): the half warp's first lane
        tab = tl.where(lead == rf, tab, float("nan"))
    return tab


@triton.jit
def lookup(tab, word, cb_ptr, r2, r_ok2, stride_cbr, BITS: tl.constexpr, A: tl.constexpr, OPAQUE: tl.constexpr):
    """``codebook[row, code]`` (fp32) for the code at bits ``[A·BITS, A·BITS + BITS)`` of ``word`` (int32,
    higher bits ignored), from arrangement ``A``'s lane table ``tab``: one shuffle."""
    if OPAQUE:
        seg = 31 & ~(((1 << BITS) - 1) << (A * BITS))  # lane bits kept from the reading lane
        v = _shfl_idx(tab, word, tl.zeros_like(word) + ((seg << 8) | 31))
    else:
        code = (word >> (A * BITS)) & ((1 << BITS) - 1)
        v = tl.load(cb_ptr + r2 * stride_cbr + code, mask=r_ok2, other=0.0).to(tl.float32)
    return v
