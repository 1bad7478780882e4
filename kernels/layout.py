"""The packed-code layout shared by every kernel and its reference.

Codes of one weight row are packed along the input dimension into int32 words, least-significant
bits first: code ``j`` of a row lives in word ``j // per_word`` at bit offset ``(j % per_word) * b``.
``per_word = 32 // b`` for b in {1, 2, 4} and 10 for b = 3 (the top 2 bits of a 3-bit word are
unused). Padding codes past ``in_features`` are zero. A word whose top bit is set is stored as a
negative int32 (two's complement); readers mask after shifting, so the sign never matters.
"""

from __future__ import annotations

SUPPORTED_BITS = (1, 2, 3, 4)


def codes_per_word(bits: int) -> int:
    """How many ``bits``-wide codes one int32 word holds (32 // bits; 10 for 3 bits)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bit-width must be one of {SUPPORTED_BITS}, got {bits!r}")
    return 10 if bits == 3 else 32 // bits


def words_per_row(in_features: int, bits: int) -> int:
    """Number of int32 words that hold one row of ``in_features`` codes at ``bits`` bits."""
    per_word = codes_per_word(bits)
    return (in_features + per_word - 1) // per_word


def num_groups(in_features: int, group_size: int) -> int:
    """Number of absmax groups along a row (the last one is partial when group_size ∤ in)."""
    return (in_features + group_size - 1) // group_size
