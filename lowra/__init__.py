"""LowRA: LoRA fine-tuning on frozen LLM weights quantized to 1–4 bits per output channel.

Public API (see README.md): the quantized-weight format, the learned per-channel codebooks,
the quantizers, the precision planner, the LoRA module and the model-level functions.
"""

# Names are imported on first use (PEP 562), so ``import lowra.format`` (the tensor format and the
# kernels) works in a bare torch + triton environment without the planner's or trainer's
# dependencies (scipy, cvxpy, transformers, ...).
_EXPORTS = {
    "ActivationWhitening": "lowra.loftq",
    "BitGroup": "lowra.format",
    "ERROR_TABLES": "lowra.error_tables",
    "calibration_statistics": "lowra.error_tables",
    "calibration_windows": "lowra.calibration",
    "collect_fisher": "lowra.calibration",
    "kfac_row_errors": "lowra.error_tables",
    "row_error_table": "lowra.error_tables",
    "row_storage_bits": "lowra.format",
    "CodebookResult": "lowra.codebook",
    "FormatError": "lowra.format",
    "GroupScales": "lowra.scales",
    "LoftQResult": "lowra.loftq",
    "LowRALinear": "lowra.nn",
    "PrecisionPlan": "lowra.precision",
    "QuantizationReport": "lowra.model",
    "QuantizedTensor": "lowra.format",
    "Quantizer": "lowra.quantizers",
    "assign_precision": "lowra.precision",
    "compute_absmax": "lowra.scales",
    "export_peft_adapters": "lowra.checkpoint",
    "find_target_linears": "lowra.model",
    "get_quantizer": "lowra.quantizers",
    "learn_codebooks": "lowra.codebook",
    "load_quantized": "lowra.checkpoint",
    "loftq_init": "lowra.loftq",
    "lora_parameters": "lowra.model",
    "lowra_layers": "lowra.model",
    "mark_only_lora_trainable": "lowra.model",
    "memory_report": "lowra.memory",
    "merge_to_hf": "lowra.checkpoint",
    "normal_float_table": "lowra.normalfloat",
    "quantize": "lowra.quantizers",
    "quantize_model": "lowra.model",
    "quantize_pretrained": "lowra.streaming",
    "read_manifest": "lowra.checkpoint",
    "register_quantizer": "lowra.quantizers",
    "save_quantized": "lowra.checkpoint",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lowra' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "ActivationWhitening",
    "BitGroup",
    "ERROR_TABLES",
    "calibration_statistics",
    "calibration_windows",
    "collect_fisher",
    "kfac_row_errors",
    "row_error_table",
    "row_storage_bits",
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
    "quantize_pretrained",
    "read_manifest",
    "register_quantizer",
    "save_quantized",
]
