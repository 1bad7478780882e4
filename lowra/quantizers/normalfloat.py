"""NormalFloat quantizer: one fixed NF table shared by all rows (the QLoRA / LoftQ baseline)."""

from __future__ import annotations

import torch

from lowra.normalfloat import normal_float_table
from lowra.quantizers.base import Quantizer


class NormalFloatQuantizer(Quantizer):
    """QLoRA's NF4 (and LoftQ's NF2/NF3) with per-group absmax; the table is stored once."""

    name = "nf"

    def codebooks(self, weight, bits_per_row, group_size, double_quant, **options):
        if options:
            raise ValueError(f"method 'nf' takes no options, got {sorted(options)}")
        return {b: normal_float_table(b)[None] for b in torch.unique(bits_per_row).tolist()}
