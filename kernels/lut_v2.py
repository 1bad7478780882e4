"""Shared pieces of the v2 LUT kernels (``gemv_v2``, ``dequantize_v2``) on layout v2 (``layout_v2``).

``chunk_words`` / ``chunk_codes`` take one scale-group chunk of a K tile of a block of rows (each
row's words loaded as whole vectors) as ``[BLOCK, words, 1]`` words or ``[BLOCK, words, codes per
word]`` integer codes (constant shifts; 3 bits: a 2-bit and a 1-bit plane); the 3-D shape keeps each
thread's codes within its own words, so no cross-thread reduction enters the K loop. ``select``
looks 1–2-bit codes up by a binary select tree testing the code's bits in place in the word, over
leaves loaded once per program (``leaves``). ``gather_table`` / ``gather_lookup`` are the 3–4-bit
lookup: a transposed flat table ``table[code · BLOCK + row]`` built once per program
(conflict-free: the lanes of a warp take consecutive rows, so consecutive banks, whatever their
codes), looked up by ``tl.gather``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_codes(q_tile, r, r_ok, H: tl.constexpr, BITS: tl.constexpr, WPG: tl.constexpr, CPW: tl.constexpr):
    """Integer codes ``[BLOCK, WPG, CPW]`` (int32) of scale-group chunk ``H`` (codes ``H · WPG · CPW`` ..)
    of one K tile of rows ``r`` (``q_tile``: the tile's ``[n, tile words]`` slab): ``WPG`` words of
    ``CPW`` codes, each word one row's, loaded as whole vectors and unpacked by constant shifts.
    3 bits: ``CPW = 16`` low 2-bit codes from the 8-word plane, the high bit from the 4-word plane."""
    w = tl.arange(0, WPG)[None, :]
    s = tl.arange(0, CPW)[None, None, :]
    if BITS == 3:
        lo = tl.load(q_tile + r[:, None] * 12 + H * WPG + w, mask=r_ok[:, None], other=0)
        # code (w, s) is code 16·w + s of the chunk: high-plane word (H·WPG + w) // 2, bit 16·(w % 2) + s
        hi = tl.load(q_tile + r[:, None] * 12 + 8 + (H * WPG + w) // 2, mask=r_ok[:, None], other=0)
        codes = ((lo[:, :, None] >> (s * 2)) & 3) | (((hi[:, :, None] >> ((w[:, :, None] % 2) * 16 + s)) & 1) << 2)
    else:
        TW: tl.constexpr = 128 * BITS // 32
        words = tl.load(q_tile + r[:, None] * TW + H * WPG + w, mask=r_ok[:, None], other=0)
        codes = (words[:, :, None] >> (s * BITS)) & ((1 << BITS) - 1)
    return codes


@triton.jit
def _pick(word, shift, BIT: tl.constexpr, lo, hi):
    return tl.where((word & (1 << (shift + BIT))) != 0, hi, lo)


@triton.jit
def select(word, shift, e0, e1, e2, e3, BITS: tl.constexpr):
    """``entry[code]`` for 1–2-bit codes at bit ``shift`` of ``word`` from leaves ``e0..e3`` (e2, e3
    unused at 1 bit): the code's bits are tested in place (a constant mask per element), not shifted out."""
    if BITS == 1:
        v = _pick(word, shift, 0, e0, e1)
    else:
        v = _pick(word, shift, 1, _pick(word, shift, 0, e0, e1), _pick(word, shift, 0, e2, e3))
    return v


@triton.jit
def chunk_words(q_tile, r, r_ok, H: tl.constexpr, BITS: tl.constexpr, WPG: tl.constexpr):
    """The ``[BLOCK, WPG, 1]`` words of scale-group chunk ``H`` of one K tile of rows ``r`` (1, 2, 4 bits)."""
    TW: tl.constexpr = 128 * BITS // 32
    w = tl.arange(0, WPG)[None, :]
    return tl.load(q_tile + r[:, None] * TW + H * WPG + w, mask=r_ok[:, None], other=0)[:, :, None]


@triton.jit
def leaf(cb_ptr, r, r_ok, stride_cbr, J: tl.constexpr):
    """Codebook entry ``J`` ``[BLOCK, 1]`` (fp32) of rows ``r``."""
    return tl.load(cb_ptr + r[:, None] * stride_cbr + J, mask=r_ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def leaves(cb_ptr, r, r_ok, stride_cbr, BITS: tl.constexpr):
    """The four leaves ``[BLOCK, 1]`` (fp32) of rows ``r``'s 1–2-bit codebooks (1 bit: e2, e3 repeat e0, e1)."""
    e0 = leaf(cb_ptr, r, r_ok, stride_cbr, 0)
    e1 = leaf(cb_ptr, r, r_ok, stride_cbr, 1)
    if BITS > 1:
        e2 = leaf(cb_ptr, r, r_ok, stride_cbr, 2)
        e3 = leaf(cb_ptr, r, r_ok, stride_cbr, 3)
    else:
        e2 = e0
        e3 = e1
    return e0, e1, e2, e3


@triton.jit
def gather_table(cb_ptr, r, r_ok, stride_cbr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Flat fp32 table ``[2^BITS · BLOCK]``: entry ``c · BLOCK + j`` is row ``r[j]``'s codebook entry ``c``."""
    NC: tl.constexpr = 1 << BITS
    c = tl.arange(0, NC)[:, None]
    tab = tl.load(cb_ptr + r[None, :] * stride_cbr + c, mask=r_ok[None, :], other=0.0).to(tl.float32)
    return tl.reshape(tab, [NC * BLOCK])


@triton.jit
def gather_lookup(table, code, BLOCK: tl.constexpr, WPG: tl.constexpr, CPW: tl.constexpr):
    """``table[code · BLOCK + row]`` for codes ``[BLOCK, WPG, CPW]`` (row = the first index)."""
    idx = code * BLOCK + tl.arange(0, BLOCK)[:, None, None]
    v = tl.gather(table, tl.reshape(idx, [BLOCK * WPG * CPW]), 0)
    return tl.reshape(v, [BLOCK, WPG, CPW])
