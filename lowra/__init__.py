"""LowRA: LoRA fine-tuning on frozen LLM weights quantized to 1–4 bits per output channel.

Public API (see README.md): the quantized-weight format, the learned per-channel codebooks,
the quantizers, the precision planner, and the model-level functions.
"""

from lowra.codebook import CodebookResult, learn_codebooks
from lowra.format import BitGroup, FormatError, QuantizedTensor
from lowra.normalfloat import normal_float_table
from lowra.quantizers import Quantizer, get_quantizer, quantize, register_quantizer
from lowra.scales import GroupScales, compute_absmax

__all__ = [
    "BitGroup",
    "CodebookResult",
    "FormatError",
    "GroupScales",
    "QuantizedTensor",
    "Quantizer",
    "compute_absmax",
    "get_quantizer",
    "learn_codebooks",
    "normal_float_table",
    "quantize",
    "register_quantizer",
]
