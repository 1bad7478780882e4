"""Round-to-nearest on a uniform grid of ``2**b`` points spanning [-1, 1] (symmetric absmax).

The grid has no exact zero for even point counts, which keeps the 1-bit case meaningful (±1).
"""

from __future__ import annotations

import torch

from lowra.quantizers.base import Quantizer


def uniform_table(bits: int) -> torch.Tensor:
    """``2**bits`` evenly spaced values from -1 to 1 (fp32)."""
    return torch.linspace(-1.0, 1.0, 2**bits)


class UniformQuantizer(Quantizer):
    """Symmetric absmax round-to-nearest, one grid shared by all rows."""

    name = "uniform"

    def codebooks(self, weight, bits_per_row, group_size, double_quant, **options):
        if options:
            raise ValueError(f"method 'uniform' takes no options, got {sorted(options)}")
        return {b: uniform_table(b)[None] for b in torch.unique(bits_per_row).tolist()}
