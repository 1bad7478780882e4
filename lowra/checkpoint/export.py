"""Leave the quantized format: ``merge_to_hf`` (a plain HF model: ``deq(base) + s·B·A`` or the
dequantized base alone) and ``export_peft_adapters`` (PEFT's LoRA format)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from lowra.atomic import file_mode, write_text_atomic
from lowra.checkpoint.common import _atomic_dir, _dense_dtype, _empty_model, _most_common
from lowra.format import save_safetensors_atomic, tensor_sha256
from lowra.integrity import write_checksums
from lowra.model_layers import lowra_layers

__all__ = ["export_peft_adapters", "merge_to_hf", "quantized_fingerprint"]


def _plain_state(model: nn.Module, include_adapters: bool, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``state_dict`` of the equivalent plain model: LowRALinear → ``weight`` (+ ``bias``)."""
    state = {}
    layers = dict(lowra_layers(model))
    skip = set()
    for name, m in layers.items():
        skip |= {f"{name}.{k}" for k in ("lora_A", "lora_B", "dense_weight", "bias")}
        w = m.merged_weight(torch.float32) if include_adapters else m.dequantized_weight(torch.float32)
        state[f"{name}.weight"] = w.to(dtype or _dense_dtype(model))
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias.to(dtype or m.bias.dtype)
    for k, v in model.state_dict().items():
        if k not in skip:
            state[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return state


def merge_to_hf(
    model: nn.Module,
    directory: str | os.PathLike,
    include_adapters: bool = True,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``deq(base) + s·B·A`` (or the dequantized base alone) as a plain HF model.

    The result is written with ``save_pretrained`` and reloads with
    ``AutoModelForCausalLM.from_pretrained`` (or the seq2seq auto class for BART); its
    ``lowra_checksums.json`` (kind ``merged``, or ``dequantized_base`` with the model's
    ``quantized_fingerprint``) is checked by ``lowra.load_merged`` (plain ``from_pretrained`` checks
    nothing: ``python -m lowra.integrity DIR``). The quantized ``model`` is not modified. Atomic:
    written into a temp dir that replaces ``directory``.
    """
    if not lowra_layers(model):
        raise ValueError("the model has no LowRALinear layers; nothing to merge")
    config = copy.deepcopy(model.config)
    if getattr(config, "quantization_config", None) is not None:
        # a model loaded from a LowRA folder carries its quantization_config; the merged folder is a
        # plain model, and with the config kept `from_pretrained` would look for the LowRA tensors
        del config.quantization_config
    state = _plain_state(model, include_adapters, dtype)
    plain = _empty_model(type(model), config)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    leftover = [n for n, p in plain.named_parameters() if p.device.type == "meta"]
    if leftover or unexpected:
        raise RuntimeError(f"merge failed: missing {leftover[:5]}, unexpected {list(unexpected)[:5]}")
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    with _atomic_dir(directory) as tmp:
        plain.save_pretrained(tmp)
        for f in tmp.iterdir():  # transformers writes the weights through a 0600 temp file
            if f.is_file():
                os.chmod(f, file_mode())
        if include_adapters:
            write_checksums(tmp, "merged")
        else:  # export_peft_adapters recognises the base of these adapters by the fingerprint
            write_checksums(tmp, "dequantized_base", fingerprint=quantized_fingerprint(model))
    return Path(directory)


def quantized_fingerprint(model: nn.Module) -> str:
    """sha256 over the names and digests of every stored tensor of a quantized model but its adapters.

    Two models share it exactly when their dequantized bases are the same; a dequantized base folder
    records it (``lowra_checksums.json``) so that ``export_peft_adapters`` can tell that a named base
    is the one its adapters fit.
    """
    from lowra.hf import hf_state_dict

    h = hashlib.sha256()
    for key, t in sorted(hf_state_dict(model).items()):
        if not key.endswith((".lora_A", ".lora_B")):
            h.update(f"{key}:{tensor_sha256(t)};".encode())
    return h.hexdigest()


def export_peft_adapters(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    include_base: bool = False,
) -> Path:
    """Write the adapters in PEFT's LoRA format (``adapter_config.json`` + ``adapter_model.safetensors``).

    Keys are ``base_model.model.<layer>.lora_A.weight`` ``[r, in]`` / ``lora_B.weight`` ``[out, r]``.
    Ranks/alphas that differ between layers go to PEFT's ``rank_pattern`` / ``alpha_pattern``.
    The adapters fit the *dequantized* base, so ``adapter_config.json``'s ``base_model_name_or_path``
    (what PEFT's own loading, ``AutoPeftModelForCausalLM.from_pretrained(directory)``, loads them on)
    must name it:

    * ``include_base=True`` writes it beside the adapters, in ``directory/base`` (``merge_to_hf(...,
      include_adapters=False)``: a full dense copy of the model, e.g. 2 bytes per weight in fp16 —
      13.5 GB for a 7B model; 1.0 MB for stories260K in fp32), and names its absolute path;
    * else ``base_model_name_or_path`` is required. A dequantized base folder of this model (its
      ``lowra_checksums.json`` fingerprint matches) is accepted silently; any other name is written
      with a ``UserWarning`` (nothing proves it is the right base; the fp32 source model is wrong).

    The folder gets ``lowra_checksums.json`` (``lowra.load_peft`` checks it; plain PEFT does not:
    ``python -m lowra.integrity DIR`` first). Atomic: written into a temp dir that replaces ``directory``.

    Raises:
        ValueError: neither ``include_base`` nor ``base_model_name_or_path``, or both; a dequantized
            base folder of another model.
    """
    if include_base and base_model_name_or_path:
        raise ValueError("export_peft_adapters: give include_base=True or base_model_name_or_path, not both")
    if not include_base:
        if not base_model_name_or_path:
            raise ValueError("export_peft_adapters needs base_model_name_or_path: the dequantized base the adapters "
                             "fit (lowra.merge_to_hf(model, dir, include_adapters=False) writes it), not the "
                             "full-precision source model, on which they give wrong logits; or include_base=True "
                             "to write that base beside the adapters")
        _check_named_base(model, base_model_name_or_path)
    directory = Path(directory)
    with _atomic_dir(directory) as tmp:
        base = base_model_name_or_path
        if include_base:
            merge_to_hf(model, tmp / "base", include_adapters=False)
            base = str((directory / "base").resolve())
        _write_peft_adapters(model, tmp, base, task_type)
        write_checksums(tmp, "peft_adapter")
    return directory


def _check_named_base(model: nn.Module, base: str) -> None:
    """Warn (or refuse a dequantized base of another model) unless ``base`` is this model's dequantized base."""
    from lowra.integrity import CHECKSUMS, read_checksums

    path = Path(base)
    if (path / CHECKSUMS).is_file():
        manifest = read_checksums(path)
        if manifest["kind"] == "dequantized_base":
            if manifest.get("fingerprint") != quantized_fingerprint(model):
                raise ValueError(f"{base} is the dequantized base of another quantized model (its fingerprint "
                                 "differs): these adapters would give wrong logits on it")
            return
    warnings.warn(f"export_peft_adapters: cannot check that {base!r} is the dequantized base these adapters fit "
                  "(it is no dequantized-base folder written by lowra.merge_to_hf(..., include_adapters=False)); "
                  "PEFT on any other base — the full-precision source model included — gives wrong logits. "
                  "include_base=True writes the right base beside the adapters", UserWarning, stacklevel=3)


def _write_peft_adapters(
    model: nn.Module, directory: Path, base_model_name_or_path: str, task_type: str | None
) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory``."""
    layers = [(n, m) for n, m in lowra_layers(model) if m.rank]
    if not layers:
        raise ValueError("the model has no LoRA adapters to export")
    ranks = _most_common([m.rank for _, m in layers])
    alphas = _most_common([m.alpha for _, m in layers])
    dropouts = {float(getattr(m.lora_dropout, "p", 0.0)) for _, m in layers}
    if task_type is None:
        encdec = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        task_type = "SEQ_2_SEQ_LM" if encdec else "CAUSAL_LM"
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": ranks,
        "lora_alpha": alphas,
        "lora_dropout": max(dropouts),
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {n: m.rank for n, m in layers if m.rank != ranks},
        "alpha_pattern": {n: m.alpha for n, m in layers if m.alpha != alphas},
        "use_rslora": False,
        "use_dora": False,
    }
    tensors = {}
    for name, m in layers:
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().contiguous()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(tensors, directory / "adapter_model.safetensors", {"format": "pt"})
    write_text_atomic(directory / "adapter_config.json", json.dumps(config, indent=2))
