"""Save a quantized model: ``save_quantized`` (a Hugging Face model folder, format version 2,
``lowra.hf``) and ``save_quantized_legacy`` (the version-1 manifest layout); ``is_checkpoint``.

Both are atomic: the HF folder is written under a temporary name beside its place and renamed in
(``_atomic_dir``); the legacy layout writes its data files under a fresh token and replaces
``manifest.json`` last (see :mod:`lowra.checkpoint`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowra.atomic import write_text_atomic
from lowra.checkpoint.common import (
    _DATA_FILE,
    _TOKENIZER_FILES,
    ADAPTER_DIR,
    DEFAULT_MAX_SHARD_SIZE,
    MANIFEST,
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    REPORT_FILE,
    _atomic_dir,
    _dedupe_tied,
    _dense_dtype,
    _fsync,
    _source_model,
    _split_state,
)
from lowra.checkpoint.export import _write_peft_adapters
from lowra.format import file_sha256, save_safetensors_atomic
from lowra.integrity import write_checksums
from lowra.linear import LowRALinear
from lowra.model_layers import lowra_layers

__all__ = ["is_checkpoint", "save_quantized", "save_quantized_legacy"]


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    report: Any | None = None,
    source_model: str | None = None,
    tokenizer: Any | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Save a model quantized by ``quantize_model`` as a Hugging Face model folder (``lowra.hf``).

    Writes ``config.json`` (with ``quantization_config``), ``generation_config.json``, the weights
    (``model.safetensors``, or shards of at most ``max_shard_size`` with
    ``model.safetensors.index.json``, as ``save_pretrained`` does), the tokenizer, the report
    (``lowra_report.json``) and the adapters in PEFT's format (``adapter/``). The model is not modified.

    Args:
        report: a ``QuantizationReport`` (default ``model.lowra_report``): its options go into
            ``quantization_config`` and it is written to ``lowra_report.json``.
        source_model: id or path of the original model (default: the model's ``name_or_path``).
        tokenizer: saved with ``save_pretrained``; ``None`` copies the tokenizer files of a local
            ``source_model`` folder when there are any.
        max_shard_size: bytes (int) or a size string such as ``"5GB"``.
    Returns the directory. Atomic: written under a temporary name beside it, then renamed.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from lowra.hf import (
        LowRAHfConfig,
        dense_digests,
        guard_name,
        guard_tensor,
        hf_state_dict,
        layer_layout,
        quantization_config_dict,
    )

    if not lowra_layers(model):
        raise ValueError("the model has no LowRALinear layers; run lowra.quantize_model first")
    if getattr(model, "config", None) is None or not hasattr(model, "save_pretrained"):
        raise ValueError("save_quantized needs a Hugging Face model (a PreTrainedModel with .config)")
    report = report if report is not None else getattr(model, "lowra_report", None)
    previous = getattr(model.config, "quantization_config", None)  # set when loaded from a LowRA folder
    loaded_from = _source_model(model)
    source = source_model or getattr(previous, "source_model", None) or loaded_from
    state = hf_state_dict(model)
    layout = layer_layout(model, state)
    state = remove_tied_weights_from_state_dict(state, model)
    state[guard_name(layout)] = guard_tensor()  # plain transformers (no `import lowra`) refuses the folder
    config = copy.deepcopy(model.config)
    config.quantization_config = LowRAHfConfig(
        layout=layout, dense=dense_digests(state, layout), source_model=source,
        **quantization_config_dict(model, report),
    )
    config.architectures = [type(model).__name__]
    config.dtype = str(_dense_dtype(model)).removeprefix("torch.")  # what from_pretrained builds the rest in
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    with _atomic_dir(directory) as tmp:
        config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():
            generation.save_pretrained(tmp)
        for filename, names in split.filename_to_tensors.items():
            save_safetensors_atomic({k: state[k] for k in names}, tmp / filename, {"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_parameters": sum(t.numel() for t in state.values()), **split.metadata},
                     "weight_map": split.tensor_to_filename}
            write_text_atomic(tmp / "model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            _copy_tokenizer_files([source, loaded_from], tmp)
        if report is not None:
            write_text_atomic(tmp / REPORT_FILE, json.dumps(report.to_dict(), indent=1))
        if any(m.rank for _, m in lowra_layers(model)):
            # The adapters fit the dequantized base, not the source model: PEFT's convention (load the base the
            # config names, apply the adapter) must not silently pair them with `source`. It names this folder,
            # which PEFT refuses loudly (LowRALinear is no nn.Linear; without `import lowra`, the guard tensor).
            _write_peft_adapters(model, tmp / ADAPTER_DIR, str(Path(directory).resolve()), None)
            write_text_atomic(tmp / ADAPTER_DIR / "README.md", _ADAPTER_README.format(source=source))
            write_checksums(tmp / ADAPTER_DIR, "peft_adapter")
        # every file listed; the weight shards by their header (each tensor has its digest in config.json)
        write_checksums(tmp, "lowra", header_only=tuple(split.filename_to_tensors))
    return Path(directory)


_ADAPTER_README = """# LoRA adapters of a LowRA checkpoint (PEFT format)

These adapters were trained on the *dequantized* LowRA base, not on the full-precision model they
were quantized from ({source}). Applied to that model they give wrong logits, so
`adapter_config.json` names the LowRA folder itself, which PEFT refuses to wrap (loudly).
For a copy that PEFT's own loading gets right, export the adapters with the dequantized base beside
them (a full dense copy of the model):

    import lowra
    lowra.export_peft_adapters(lowra.load_quantized("<this folder>"), "<out>", include_base=True)
    # then: peft.AutoPeftModelForCausalLM.from_pretrained("<out>"), or lowra.load_peft("<out>") (checksums checked)

or load the LowRA folder directly (`import lowra` first): its model weights carry the adapters.
"""


def _copy_tokenizer_files(candidates: list[str | None], target: Path) -> None:
    """Copy the tokenizer files of the first local folder among ``candidates`` that has any."""
    for folder in candidates:
        if folder is None or not Path(folder).is_dir():
            continue
        found = [Path(folder) / n for n in _TOKENIZER_FILES if (Path(folder) / n).is_file()]
        for f in found:
            shutil.copyfile(f, target / f.name)
        if found:
            return


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """True if ``directory`` holds a complete LowRA save (an HF folder or the legacy manifest layout)."""
    from lowra.hf import is_lowra_hf_folder

    return (Path(directory) / MANIFEST).is_file() or is_lowra_hf_folder(directory)


# ---------------------------------------------------------------------------------- save (legacy)
def save_quantized_legacy(
    model: nn.Module,
    directory: str | os.PathLike,
    report: Any | None = None,
    source_model: str | None = None,
) -> Path:
    """Save in the version-1 manifest layout (see the module docstring); ``save_quantized`` writes HF folders.

    Args:
        report: a ``QuantizationReport`` (default ``model.lowra_report``) stored in the manifest.
        source_model: id or path of the original model (default: the model's ``name_or_path``).
    Returns the directory. Atomic: see the module docstring.
    """
    layers = lowra_layers(model)
    if not layers:
        raise ValueError("the model has no LowRALinear layers; run lowra.quantize_model first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    files = {
        "config": f"config.{token}.json",
        "quantized": f"quantized.{token}.safetensors",
        "adapters": f"adapters.{token}.safetensors",
        "rest": f"rest.{token}.safetensors",
    }
    report = report if report is not None else getattr(model, "lowra_report", None)
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("save_quantized needs a Hugging Face model (with .config)")

    quantized: dict[str, torch.Tensor] = {}
    layer_meta: dict[str, Any] = {}
    for name, m in layers:
        meta = {
            "shape": [m.out_features, m.in_features],
            "base": "quantized" if m.is_quantized else "dense",
            "rank": m.rank,
            "alpha": m.alpha,
            "dropout": float(getattr(m.lora_dropout, "p", 0.0)),
            "bias": m.bias is not None,
        }
        if m.is_quantized:
            qt = m.qweight
            for k, t in qt.state_dict().items():
                quantized[f"{name}/{k}"] = t.contiguous()
            quantized[f"{name}/plan.bits"] = qt.bits_per_row.to(torch.int8)
            meta["quantized"] = qt.metadata()
            meta["nominal_bits"] = qt.nominal_bits
            meta["effective_bits"] = qt.effective_bits
        layer_meta[name] = meta
    adapters, rest = _split_state(model)
    rest, aliases = _dedupe_tied(rest)
    header = {"format": MODEL_FORMAT, "format_version": str(MODEL_FORMAT_VERSION)}

    try:
        write_text_atomic(directory / files["config"], config.to_json_string())
        save_safetensors_atomic(quantized, directory / files["quantized"], header)
        save_safetensors_atomic(adapters, directory / files["adapters"], header)
        save_safetensors_atomic(rest, directory / files["rest"], header)
        for f in files.values():
            _fsync(directory / f)
    except BaseException:
        for f in files.values():
            with contextlib.suppress(FileNotFoundError):
                (directory / f).unlink()
        raise

    import transformers

    manifest = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "method": report.method if report is not None else _method_of(layers),
        "bits": report.bits_target if report is not None else None,
        "bits_nominal": _weighted(layers, "nominal_bits"),
        "bits_effective": _weighted(layers, "effective_bits"),
        "source_model": source_model if source_model is not None else _source_model(model),
        "model_class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "files": files,
        "file_sizes": {k: (directory / f).stat().st_size for k, f in files.items()},
        "file_sha256": {k: file_sha256(directory / f) for k, f in files.items()},
        "layers": layer_meta,
        "tied": aliases,
        "report": report.to_dict() if report is not None else None,
        # the LowRAConfig the model was quantized with (LowRAConfig.to_dict(): an HF quantization_config)
        "lowra_config": _config_dict(model, report),
    }
    write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=1))
    # the new save is committed; drop older data files (ours only, by name pattern)
    keep = set(files.values())
    for f in directory.iterdir():
        if _DATA_FILE.match(f.name) and f.name not in keep:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
    return directory


def _config_dict(model: nn.Module, report: Any | None) -> dict[str, Any] | None:
    from lowra.hf import lowra_config_dict

    return lowra_config_dict(model, report)


def _method_of(layers: list[tuple[str, LowRALinear]]) -> str:
    methods = {m.qweight.method if m.is_quantized else "none" for _, m in layers}
    return methods.pop() if len(methods) == 1 else "mixed"


def _weighted(layers: list[tuple[str, LowRALinear]], attr: str) -> float:
    total = sum(m.in_features * m.out_features for _, m in layers)
    return sum(getattr(m, attr) * m.in_features * m.out_features for _, m in layers) / total
