"""Leave the quantized format: ``merge_to_hf`` (a plain HF model: ``deq(base) + s·B·A`` or the
dequantized base alone) and ``export_peft_adapters`` (PEFT's LoRA format)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from lowra.atomic import write_text_atomic
from lowra.checkpoint.common import _atomic_dir, _dense_dtype, _empty_model, _most_common
from lowra.format import save_safetensors_atomic
from lowra.layers import lowra_layers

__all__ = ["export_peft_adapters", "merge_to_hf"]


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
    ``AutoModelForCausalLM.from_pretrained`` (or the seq2seq auto class for BART). The quantized
    ``model`` is not modified. Atomic: written into a temp dir that replaces ``directory``.
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
    return Path(directory)


def export_peft_adapters(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write the adapters in PEFT's LoRA format (``adapter_config.json`` + ``adapter_model.safetensors``).

    Keys are ``base_model.model.<layer>.lora_A.weight`` ``[r, in]`` / ``lora_B.weight`` ``[out, r]``.
    Ranks/alphas that differ between layers go to PEFT's ``rank_pattern`` / ``alpha_pattern``.
    The adapters belong on the dequantized base (see ``merge_to_hf(include_adapters=False)``), so
    ``base_model_name_or_path`` must name it (PEFT's convention loads that base): it is required; the
    full-precision source model would silently give wrong logits.
    Atomic: written into a temp dir that replaces ``directory``.

    Raises:
        ValueError: no ``base_model_name_or_path``.
    """
    if not base_model_name_or_path:
        raise ValueError("export_peft_adapters needs base_model_name_or_path: the dequantized base the adapters fit "
                         "(lowra.merge_to_hf(model, dir, include_adapters=False) writes it), not the full-precision "
                         "source model, on which they give wrong logits")
    with _atomic_dir(directory) as tmp:
        _write_peft_adapters(model, tmp, base_model_name_or_path, task_type)
    return Path(directory)


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
