"""LowRA: LoRA fine-tuning on frozen LLM weights quantized to 1–4 bits per output channel.

Public API (see README.md): the quantized-weight format, the learned per-channel codebooks,
the quantizers, the precision planner, and the model-level functions.
"""

from lowra.format import BitGroup, FormatError, QuantizedTensor
from lowra.scales import GroupScales, compute_absmax

__all__ = [
    "BitGroup",
    "FormatError",
    "GroupScales",
    "QuantizedTensor",
    "compute_absmax",
]
