"""Quantizers: one protocol (``Quantizer``), many methods, one output format (``QuantizedTensor``).

``get_quantizer(name)`` returns a registered method; ``quantize(W, bits, method=...)`` is the
one-call entry point.
"""

from __future__ import annotations

import torch

from lowra.format import QuantizedTensor
from lowra.quantizers.base import Quantizer
from lowra.quantizers.learned import LearnedCodebookQuantizer
from lowra.quantizers.normalfloat import NormalFloatQuantizer
from lowra.quantizers.uniform import UniformQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {
    q.name: q for q in (LearnedCodebookQuantizer, NormalFloatQuantizer, UniformQuantizer)
}


def register_quantizer(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator that adds a quantizer to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError("a quantizer needs a non-empty name")
    QUANTIZERS[cls.name] = cls
    return cls


def get_quantizer(name: str) -> Quantizer:
    """A new instance of the quantizer registered as ``name``."""
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantization method {name!r}; choose one of {sorted(QUANTIZERS)}")
    return QUANTIZERS[name]()


def quantize(
    weight: torch.Tensor,
    bits: int | float | torch.Tensor,
    method: str = "lowra",
    group_size: int = 64,
    double_quant: bool = False,
    **options,
) -> QuantizedTensor:
    """Quantize ``weight [out, in]`` with ``method`` at ``bits`` (int, or int tensor ``[out]``)."""
    return get_quantizer(method).quantize(weight, bits, group_size, double_quant, **options)


__all__ = ["QUANTIZERS", "Quantizer", "get_quantizer", "quantize", "register_quantizer"]

from lowra.quantizers.optq import OPTQQuantizer  # noqa: E402,F401  (importing registers "optq")
