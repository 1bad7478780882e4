"""Pack ``b``-bit codes into int32 words along the input dimension (layout: ``kernels.layout``).

``pack_ref`` is the pure-PyTorch reference (the CPU path and the test oracle).
"""

from __future__ import annotations

import torch

from kernels.layout import codes_per_word, words_per_row


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
