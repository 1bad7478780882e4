"""LowRA: LoRA fine-tuning on frozen LLM weights quantized to 1–4 bits per output channel.

Public API (see README.md): the quantized-weight format, the learned per-channel codebooks,
the quantizers, the precision planner, the LoRA module and the model-level functions.
"""

from lowra.checkpoint import export_peft_adapters, load_quantized, merge_to_hf, read_manifest, save_quantized
from lowra.codebook import CodebookResult, learn_codebooks
from lowra.format import BitGroup, FormatError, QuantizedTensor
from lowra.loftq import LoftQResult, loftq_init
from lowra.memory import memory_report
from lowra.model import (
    QuantizationReport,
    find_target_linears,
    lora_parameters,
    lowra_layers,
    mark_only_lora_trainable,
    quantize_model,
)
from lowra.nn import LowRALinear
from lowra.normalfloat import normal_float_table
from lowra.precision import PrecisionPlan, assign_precision
from lowra.quantizers import Quantizer, get_quantizer, quantize, register_quantizer
from lowra.scales import GroupScales, compute_absmax

__all__ = [
    "BitGroup",
    "CodebookResult",
    "FormatError",
    "GroupScales",
    "LoftQResult",
    "LowRALinear",
    "PrecisionPlan",
    "QuantizationReport",
    "QuantizedTensor",
    "Quantizer",
    "assign_precision",
    "compute_absmax",
    "export_peft_adapters",
    "find_target_linears",
    "get_quantizer",
    "learn_codebooks",
    "load_quantized",
    "loftq_init",
    "lora_parameters",
    "lowra_layers",
    "mark_only_lora_trainable",
    "memory_report",
    "merge_to_hf",
    "normal_float_table",
    "quantize",
    "quantize_model",
    "read_manifest",
    "register_quantizer",
    "save_quantized",
]
