"""Unpack int32 words back into ``b``-bit codes (layout: ``kernels.layout``).

``unpack_ref`` is the pure-PyTorch reference (the CPU path and the test oracle).
"""

from __future__ import annotations

import torch

from kernels.layout import codes_per_word


def unpack_ref(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Unpack int32 words ``[rows, words]`` into int64 codes ``[rows, in_features]``."""
    if words.dim() != 2:
        raise ValueError(f"packed codes must be 2-D [rows, words], got shape {tuple(words.shape)}")
    per_word = codes_per_word(bits)
    if words.shape[1] * per_word < in_features:
        raise ValueError(
            f"{words.shape[1]} words of {per_word} codes cannot hold {in_features} codes per row"
        )
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * bits
    codes = (words.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1)[:, :in_features]
