"""LowRA: LoRA fine-tuning on frozen LLM weights quantized to 1–4 bits per output channel.

Public API (see README.md): the quantized-weight format, the learned per-channel codebooks,
the quantizers, the precision planner, the LoRA module and the model-level functions.
"""

# Names are imported on first use (PEP 562), so ``import lowra.format`` (the tensor format and the
# kernels) works in a bare torch + triton environment without the planner's or trainer's
# dependencies (scipy, cvxpy, transformers, ...).
_EXPORTS = {
    "ActivationWhitening": "lowra.adapter_init",
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
    "LoftQResult": "lowra.adapter_init",
    "LowRAConfig": "lowra.config",
    "LowRAOptions": "lowra.methods",
    "MethodOptions": "lowra.methods",
    "LowRALinear": "lowra.linear",
    "PAPER": "lowra.config",
    "ModelSource": "lowra.weights",
    "ShardSource": "lowra.weights",
    "WeightSource": "lowra.weights",
    "method_of": "lowra.methods",
    "sample_windows": "lowra.calibration",
    "PrecisionPlan": "lowra.precision",
    "QuantizationReport": "lowra.report",
    "QuantizedTensor": "lowra.format",
    "Quantizer": "lowra.quantizers",
    "assign_precision": "lowra.precision",
    "compute_absmax": "lowra.scales",
    "export_peft_adapters": "lowra.checkpoint",
    "find_target_linears": "lowra.model_layers",
    "is_checkpoint": "lowra.checkpoint",
    "get_quantizer": "lowra.quantizers",
    "learn_codebooks": "lowra.codebook",
    "load_merged": "lowra.checkpoint",
    "load_peft": "lowra.checkpoint",
    "load_quantized": "lowra.checkpoint",
    "verify_checksums": "lowra.integrity",
    "loftq_init": "lowra.adapter_init",
    "lora_parameters": "lowra.model_layers",
    "lowra_layers": "lowra.model_layers",
    "mark_only_lora_trainable": "lowra.model_layers",
    "memory_report": "lowra.model_memory",
    "merge_to_hf": "lowra.checkpoint",
    "normal_float_table": "lowra.normalfloat",
    "quantize": "lowra.quantizers",
    "quantize_model": "lowra.model_quantization",
    "quantize_pretrained": "lowra.streaming",
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
    "LowRAConfig",
    "LowRALinear",
    "LowRAOptions",
    "MethodOptions",
    "ModelSource",
    "PAPER",
    "PrecisionPlan",
    "QuantizationReport",
    "QuantizedTensor",
    "Quantizer",
    "assign_precision",
    "compute_absmax",
    "export_peft_adapters",
    "find_target_linears",
    "is_checkpoint",
    "get_quantizer",
    "learn_codebooks",
    "load_merged",
    "load_peft",
    "load_quantized",
    "verify_checksums",
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
    "register_quantizer",
    "sample_windows",
    "save_quantized",
    "ShardSource",
    "WeightSource",
    "method_of",
]


# ---------------------------------------------------------------------------------- transformers
# ``AutoModel*.from_pretrained`` of a LowRA folder needs ``quant_method="lowra"`` registered with
# transformers (``lowra.hf.register``). Importing transformers costs seconds, so ``import lowra``
# does not: it registers at once if transformers is already imported, and otherwise the moment
# ``transformers.quantizers.auto`` (which every ``from_pretrained`` goes through) is first imported.
_HF_HOOK_MODULE = "transformers.quantizers.auto"


def _register_hf() -> None:
    """Import ``lowra.hf``, which registers itself as its last statement.

    When the hook fires while ``lowra.hf`` itself is being imported (it imports transformers'
    quantizers), the import below returns the partial module and the registration runs when
    ``lowra.hf`` completes.
    """
    import lowra.hf  # noqa: F401


class _RegisterOnImport:
    """A ``sys.meta_path`` finder that runs ``_register_hf`` right after transformers' quantizer registry loads."""

    def find_spec(self, name, path=None, target=None):
        if name != _HF_HOOK_MODULE:
            return None
        import importlib.util
        import sys

        if self in sys.meta_path:
            sys.meta_path.remove(self)  # once; also keeps the lookup below from recursing
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                _register_hf()
            except Exception as exc:  # never break transformers' own import; say why LowRA folders won't load
                import warnings

                warnings.warn(f"lowra could not register quant_method='lowra' with transformers: {exc!r}",
                              RuntimeWarning, stacklevel=2)

        spec.loader.exec_module = exec_then_register
        return spec


def _install_hf_hook() -> None:
    import importlib.util
    import sys

    if _HF_HOOK_MODULE in sys.modules:
        _register_hf()
        return
    try:
        installed = importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):  # a finder that refuses transformers (bare kernel images, tests)
        installed = False
    if installed:
        sys.meta_path.insert(0, _RegisterOnImport())


_install_hf_hook()
