"""Shared pieces of the LUT kernels (``lowra_kernels.lut_matmul`` GEMV, ``lowra_kernels.dequantize``).

A K step covers ``words`` packed int32 words of each of a block of rows, as a
``[rows, words, PW2]`` tile (``PW2``: codes per word padded to a power of two). ``lut_select``
turns the packed words into codebook values with a binary select tree whose leaves are the row's
codebook entries — held in registers, optionally pre-multiplied by the row's group scale and
rounded to the output dtype once per step (exactly the rounding of each product, since selection
commutes with it).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from lowra_kernels.layout import codes_per_word

UNALIGNED_WORDS = 4  # words per row per K step when a word can straddle a group (3-bit)


def gemv_k_step(bits: int, group_size: int) -> tuple[int, int, bool]:
    """``(words, padded codes per word, aligned)`` one K step of the LUT kernels reads per row.

    Aligned (codes per word a power of two dividing ``group_size``): a step is the largest
    power-of-two chunk (≤ 256 codes) of one group, so a single scale per row applies and the
    codebook is pre-scaled once per step. Otherwise (3-bit: 10 codes per word, padded to 16) a step
    is ``UNALIGNED_WORDS`` words and the scale is looked up per code.
    """
    per_word = codes_per_word(bits)
    chunk = math.gcd(int(group_size), 256)
    if per_word & (per_word - 1) == 0 and chunk >= per_word:
        return chunk // per_word, per_word, True
    return UNALIGNED_WORDS, triton.next_power_of_2(per_word), False


GATHER_MAX_GROUPS = 4  # scale groups one gathered GEMV step may touch (table of 4 · 2^b entries per row)
GATHER_WORDS = (16, 8, 4)  # words per row per unaligned gathered GEMV step, largest that fits first


def gather_groups(bits: int, words: int, aligned: bool, group_size: int) -> int:
    """Table groups (a power of two ≤ ``GATHER_MAX_GROUPS``) of the GEMV's shared-memory lookup for
    3/4-bit codes, or 0 when the step keeps the register select tree (1/2-bit, or a step spanning
    more groups). Mirrors ``SPAN``/``NG``/``GATHER`` in ``lut_matmul._lut_gemv_kernel``."""
    if bits < 3:
        return 0
    if aligned:
        return 1
    span = (words * codes_per_word(bits) - 1) // int(group_size) + 2  # ≥ groups a step can touch
    return 0 if span > GATHER_MAX_GROUPS else (2 if span <= 2 else 4)


DEQUANT_GATHER_WORDS = (16, 8, 4, 2, 1)  # words per row per unaligned gathered dequantize step


def _gather_step(bits: int, group_size: int, candidates: tuple[int, ...]) -> tuple[int, int, bool]:
    """``gemv_k_step``, except that an unaligned 3/4-bit step (looked up by gather) takes the first of
    ``candidates`` (most words first) whose codes touch at most ``GATHER_MAX_GROUPS`` scale groups."""
    words, pw2, aligned = gemv_k_step(bits, group_size)
    if aligned or bits < 3:
        return words, pw2, aligned
    for w in candidates:
        if gather_groups(bits, w, aligned, group_size):
            return w, pw2, aligned
    return words, pw2, aligned


def dequant_step(bits: int, group_size: int) -> tuple[int, int, bool]:
    """``(words, padded codes per word, aligned)`` of one dequantize step (3-bit, group 64: 16 words =
    160 codes, a 4-group table; words from ``DEQUANT_GATHER_WORDS``). Tiny groups that no step fits
    keep ``gemv_k_step`` (select tree)."""
    return _gather_step(bits, group_size, DEQUANT_GATHER_WORDS)


def gemv_step(bits: int, group_size: int) -> tuple[int, int, bool]:
    """``(words, padded codes per word, aligned)`` of one GEMV K step (words from ``GATHER_WORDS``):
    per-step costs (table, staging, barriers) spread over more codes."""
    return _gather_step(bits, group_size, GATHER_WORDS)


@triton.jit
def _lut_leaf(cb_row, scale, row_ok, J: tl.constexpr, SCALED: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Codebook entry ``J`` of each row (fp32); pre-scaled and rounded to the activation dtype."""
    v = tl.load(cb_row + J, mask=row_ok, other=0.0).to(tl.float32)
    if SCALED:
        v = (v * scale).to(OUT_DTYPE).to(tl.float32)
    return v


@triton.jit
def lut_select(word, shift, cb_row, scale, row_ok, LO: tl.constexpr, N: tl.constexpr, BIT: tl.constexpr,
                SCALED: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """``table[code]`` by a binary select tree over the ``N`` entries from ``LO`` (N - 1 selects).

    ``code`` bit ``BIT`` of each element is bit ``shift + BIT`` of its packed ``word``: tested with
    a loop-invariant mask, without shifting the code out first.
    """
    if N == 1:
        return _lut_leaf(cb_row, scale, row_ok, LO, SCALED, OUT_DTYPE)
    else:
        lo = lut_select(word, shift, cb_row, scale, row_ok, LO, N // 2, BIT - 1, SCALED, OUT_DTYPE)
        hi = lut_select(word, shift, cb_row, scale, row_ok, LO + N // 2, N // 2, BIT - 1, SCALED, OUT_DTYPE)
        return tl.where((word & (1 << (shift + BIT))) != 0, hi, lo)
