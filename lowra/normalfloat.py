"""NormalFloat code tables (QLoRA's NF4 and LoftQ's k-bit generalization).

``normal_float_table(b)`` reproduces ``create_normal_map(offset=0.9677083, use_extra_value=True)`` of
bitsandbytes for b = 4 and LoftQ's ``create_normal_map(num_bits=b)`` for other widths: the
``2**(b-1)`` positive and ``2**(b-1) - 1`` negative quantiles of N(0, 1) between ``offset`` and 0.5,
an exact zero, divided by the largest value. The 1-bit table is the degenerate {0, 1}; LowRA starts
its 1-bit codebooks from a symmetric ±m instead (METHOD.md §1).
"""

from __future__ import annotations

import torch

NF_OFFSET = 0.9677083


def normal_float_table(bits: int, offset: float = NF_OFFSET) -> torch.Tensor:
    """Sorted fp32 NormalFloat table of ``2**bits`` values in [-1, 1]."""
    half = 2 ** bits // 2
    pos = torch.linspace(offset, 0.5, half + 1, dtype=torch.float32)[:-1].double()
    neg = torch.linspace(offset, 0.5, half, dtype=torch.float32)[:-1].double()
    values = torch.cat([
        torch.special.ndtri(pos),
        torch.zeros(1, dtype=torch.float64),
        -torch.special.ndtri(neg),
    ]).to(torch.float32)
    values = values.sort().values
    return values / values.max()
