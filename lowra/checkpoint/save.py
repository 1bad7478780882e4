"""Save a quantized model: ``save_quantized`` (a Hugging Face model folder, format version 2,
``lowra.hf``); ``is_checkpoint``.

Atomic: the folder is written under a temporary name beside its place and renamed in (``_atomic_dir``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from lowra.atomic import write_text_atomic
from lowra.checkpoint.common import (
    _TOKENIZER_FILES,
    ADAPTER_DIR,
    DEFAULT_MAX_SHARD_SIZE,
    REPORT_FILE,
    VERSION1_MANIFEST,
    _atomic_dir,
    _dense_dtype,
    _source_model,
)
from lowra.checkpoint.export import _write_peft_adapters
from lowra.format import save_safetensors_atomic
from lowra.integrity import write_checksums
from lowra.model_layers import lowra_layers

__all__ = ["is_checkpoint", "save_quantized"]


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
    """True if ``directory`` holds a LowRA save: an HF folder, or a folder of the version-1 layout, which
    ``load_quantized`` refuses saying how to convert it (so a caller that loads what this accepts fails loudly)."""
    from lowra.hf import is_lowra_hf_folder

    return (Path(directory) / VERSION1_MANIFEST).is_file() or is_lowra_hf_folder(directory)
