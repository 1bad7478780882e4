"""Unpack int32 words back into ``b``-bit codes (layout: ``lowra_kernels.layout``).

``unpack_ref`` is the pure-PyTorch reference (the CPU path and the test oracle); ``unpack``
dispatches to the Triton kernel ``_unpack_kernel`` on CUDA (or when forced).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowra_kernels.autotune import autotune, configs
from lowra_kernels.layout import codes_per_word


def _check_words(words: torch.Tensor, bits: int, in_features: int) -> int:
    """Validate packed words ``[rows, words]`` for ``in_features`` codes; return codes per word."""
    if words.dim() != 2:
        raise ValueError(f"packed codes must be 2-D [rows, words], got shape {tuple(words.shape)}")
    per_word = codes_per_word(bits)
    if words.shape[1] * per_word < in_features:
        raise ValueError(
            f"{words.shape[1]} words of {per_word} codes cannot hold {in_features} codes per row"
        )
    return per_word


def unpack_ref(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Unpack int32 words ``[rows, words]`` into int64 codes ``[rows, in_features]``."""
    per_word = _check_words(words, bits, in_features)
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * bits
    codes = (words.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1)[:, :in_features]


@autotune(
    configs(
        [{"BLOCK_R": 16, "BLOCK_C": 64}, {"BLOCK_R": 4, "BLOCK_C": 1024}],
        num_warps=(4,),
    ),
    key=["in_features", "BITS"],  # not n_rows: it differs per bit group (one tuning per shape)
)
@triton.jit
def _unpack_kernel(
    words_ptr, codes_ptr, n_rows, in_features, stride_wr, stride_cr,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """codes[r, j] = (words[r, j // PER_WORD] >> ((j % PER_WORD) * BITS)) & mask."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    col = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (r < n_rows)[:, None] & (col < in_features)[None, :]
    word = tl.load(words_ptr + r[:, None] * stride_wr + (col // PER_WORD)[None, :], mask=m, other=0)
    code = (word >> ((col % PER_WORD) * BITS)[None, :]) & ((1 << BITS) - 1)
    tl.store(codes_ptr + r[:, None] * stride_cr + col[None, :], code.to(tl.int64), mask=m)


def unpack_triton(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Triton launcher of ``unpack_ref`` (same arguments and result)."""
    per_word = _check_words(words, bits, in_features)
    rows = words.shape[0]
    codes = torch.empty(rows, in_features, dtype=torch.int64, device=words.device)
    if rows == 0 or in_features == 0:
        return codes
    if words.stride(1) != 1:
        words = words.contiguous()

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(in_features, meta["BLOCK_C"]))

    _unpack_kernel[grid](
        words, codes, rows, in_features, words.stride(0), codes.stride(0),
        BITS=bits, PER_WORD=per_word,
    )
    return codes


def unpack(words: torch.Tensor, bits: int, in_features: int, backend: str = "auto") -> torch.Tensor:
    """Dispatching launcher: int64 codes ``[rows, in_features]`` from int32 words ``[rows, words]``."""
    from lowra_kernels.dispatch import use_triton

    if use_triton(backend, words):
        return unpack_triton(words, bits, in_features)
    return unpack_ref(words, bits, in_features)
