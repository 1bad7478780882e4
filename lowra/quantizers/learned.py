"""LowRA's quantizer: a learned codebook per row and width (weighted Lloyd-Max, ``lowra.codebook``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lowra.codebook import CodebookResult, learn_codebooks
from lowra.quantizers.base import Quantizer


class LearnedCodebookQuantizer(Quantizer):
    """Per-row learned codebooks; rows may have different widths.

    Options: ``codebooks`` (a ``CodebookResult`` of this weight, or its ``{bits: [out, 2**bits]}``
    tables, to reuse, e.g. from the error table pass or a precision plan, so nothing is learned
    twice), ``iters``, ``tol``, ``weight_power``.
    """

    name = "lowra"

    def codebooks(
        self,
        weight: torch.Tensor,
        bits_per_row: torch.Tensor,
        group_size: int,
        double_quant: bool,
        codebooks: CodebookResult | Mapping[int, torch.Tensor] | None = None,
        **learn_options,
    ) -> dict[int, torch.Tensor]:
        used = torch.unique(bits_per_row).tolist()
        if codebooks is not None:
            given = codebooks if isinstance(codebooks, Mapping) else codebooks.codebooks
            missing = [b for b in used if b not in given]
            if missing:
                raise ValueError(f"the given codebooks have no {missing}-bit tables (have {sorted(given)})")
            if given[used[0]].shape[0] != weight.shape[0]:
                raise ValueError("the given codebooks were learned for a weight with another row count")
            return {b: given[b] for b in used}
        tables = {}
        for b in used:
            rows = (bits_per_row == b).nonzero().flatten()
            learned = learn_codebooks(weight[rows], bits=(b,), group_size=group_size,
                                      double_quant=double_quant, **learn_options)
            table = torch.zeros(weight.shape[0], 2**b)
            table[rows] = learned.codebooks[b]
            tables[b] = table
        return tables
