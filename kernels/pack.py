"""Pack ``b``-bit codes into int32 words along the input dimension (layout: ``lowra_kernels.layout``).

``pack_ref`` is the pure-PyTorch reference (the CPU path and the test oracle); ``pack`` dispatches
to the Triton kernel ``_pack_kernel`` on CUDA (or when forced with ``backend="triton"``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowra_kernels.autotune import autotune, configs
from lowra_kernels.layout import codes_per_word, words_per_row


def pack_ref(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[rows, in]`` (values in [0, 2**bits)) into int32 words ``[rows, words]``.

    Vectorized over rows and words: the only loop is over the ≤ 32 slots of a word.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [rows, in], got shape {tuple(codes.shape)}")
    rows, in_features = codes.shape
    per_word = codes_per_word(bits)
    n_words = words_per_row(in_features, bits)
    padded = torch.zeros(rows, n_words * per_word, dtype=torch.int64, device=codes.device)
    padded[:, :in_features] = codes.to(torch.int64) & ((1 << bits) - 1)
    slots = padded.view(rows, n_words, per_word)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    words = (slots << shifts).sum(dim=-1)  # < 2**32, exact in int64
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


@autotune(
    configs(
        [{"BLOCK_R": 16, "BLOCK_W": 16}, {"BLOCK_R": 32, "BLOCK_W": 32}],
        num_warps=(4,),
    ),
    key=["in_features", "BITS"],  # not n_rows: it differs per bit group (one tuning per shape)
)
@triton.jit
def _pack_kernel(
    codes_ptr, words_ptr, n_rows, in_features, n_words,
    stride_cr, stride_cc, stride_wr,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """words[r, w] = OR_s (codes[r, w * PER_WORD + s] & mask) << (s * BITS); zero past in."""
    pid_r = tl.program_id(0)
    pid_w = tl.program_id(1)
    r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    r_ok = r < n_rows
    acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.int32)
    for s in tl.static_range(PER_WORD):
        col = w * PER_WORD + s
        m = r_ok[:, None] & (col < in_features)[None, :]
        c = tl.load(codes_ptr + r[:, None] * stride_cr + col[None, :] * stride_cc, mask=m, other=0)
        acc = acc | ((c.to(tl.int32) & ((1 << BITS) - 1)) << (s * BITS))
    m = r_ok[:, None] & (w < n_words)[None, :]
    tl.store(words_ptr + r[:, None] * stride_wr + w[None, :], acc, mask=m)


def pack_triton(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Triton launcher of ``pack_ref`` (same arguments and result)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [rows, in], got shape {tuple(codes.shape)}")
    rows, in_features = codes.shape
    per_word = codes_per_word(bits)
    n_words = words_per_row(in_features, bits)
    words = torch.empty(rows, n_words, dtype=torch.int32, device=codes.device)
    if rows == 0 or n_words == 0:
        return words
    if codes.is_floating_point() or codes.dtype == torch.bool:
        codes = codes.to(torch.int32)

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(n_words, meta["BLOCK_W"]))

    _pack_kernel[grid](
        codes, words, rows, in_features, n_words,
        codes.stride(0), codes.stride(1), words.stride(0),
        BITS=bits, PER_WORD=per_word,
    )
    return words


def pack(codes: torch.Tensor, bits: int, backend: str = "auto") -> torch.Tensor:
    """Dispatching launcher: int32 words ``[rows, words]`` from codes ``[rows, in]``."""
    from lowra_kernels.dispatch import use_triton

    if use_triton(backend, codes):
        return pack_triton(codes, bits)
    return pack_ref(codes, bits)
