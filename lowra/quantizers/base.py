"""The quantizer protocol: every method returns a ``QuantizedTensor`` in the one shared format.

Sharing the format means the kernels, ``LowRALinear``, LoftQ, save/load and the memory accounting
are the same for every method, so comparisons differ only in the quantizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from lowra.format import QuantizedTensor
from lowra.validation import check_bits, check_group_size, check_weight


class Quantizer(ABC):
    """One quantization method.

    Attributes:
        name: registry name (``lowra.quantize(..., method=name)``).
        accepted_bits: widths the method supports per row.
        needs_calibration: the method needs per-layer input statistics (``hessian=``), which
            ``lowra.quantize_model`` collects from its ``calibration=`` token windows.
    """

    name: str = ""
    accepted_bits: tuple[int, ...] = (1, 2, 3, 4)
    needs_calibration: bool = False

    def quantize(
        self,
        weight: torch.Tensor,
        bits: int | torch.Tensor,
        group_size: int = 64,
        double_quant: bool = False,
        backend: str = "auto",
        **options,
    ) -> QuantizedTensor:
        """Quantize ``weight [out, in]`` at ``bits`` (an int, or an int tensor ``[out]`` per row)."""
        check_weight(weight)
        group_size = check_group_size(group_size)
        bits_per_row = self.bits_per_row(bits, weight.shape[0])
        codebooks = self.codebooks(weight, bits_per_row, group_size, double_quant, **options)
        return QuantizedTensor.from_codebooks(
            weight, bits_per_row, codebooks, group_size, double_quant, method=self.name, backend=backend
        )

    def bits_per_row(self, bits: int | torch.Tensor, out_features: int) -> torch.Tensor:
        """Validate ``bits`` against ``accepted_bits`` and expand it to int64 ``[out]``."""
        if isinstance(bits, torch.Tensor):
            if bits.shape != (out_features,):
                raise ValueError(f"bits per row must have shape [{out_features}], got {tuple(bits.shape)}")
            for b in torch.unique(bits).tolist():
                self._check(b)
            return bits.to(torch.int64)
        if isinstance(bits, float) and not bits.is_integer():
            raise ValueError(
                f"quantize(..., method={self.name!r}) stores every row at the given integer width, got "
                f"bits={bits}: a fractional average budget needs a per-row precision plan. Use "
                f"lowra.quantize_model(model, {bits}, method='lowra') for a whole model, or pass an int "
                "tensor [out] of per-row widths (e.g. torch.from_numpy(lowra.assign_precision(...).bits))"
            )
        return torch.full((out_features,), self._check(bits), dtype=torch.int64)

    def _check(self, bits: float) -> int:
        b = check_bits(bits)
        if b not in self.accepted_bits:
            raise ValueError(f"method {self.name!r} supports {self.accepted_bits} bits, got {b}")
        return b

    @abstractmethod
    def codebooks(
        self,
        weight: torch.Tensor,
        bits_per_row: torch.Tensor,
        group_size: int,
        double_quant: bool,
        **options,
    ) -> dict[int, torch.Tensor]:
        """Mapping values per used width: ``{b: [out, 2**b]}`` per row or ``[1, 2**b]`` shared."""
