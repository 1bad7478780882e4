"""Load a quantized model: ``load_quantized`` reads an HF folder (through ``from_pretrained`` and
``lowra.hf``'s quantizer) or the legacy manifest layout (``_load_legacy``), re-quantizing nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from lowra.checkpoint.common import MANIFEST, _config_class, _empty_model, _model_class
from lowra.checkpoint.manifest import read_manifest
from lowra.format import FormatError, QuantizedTensor, load_safetensors_checked
from lowra.integrity import CHECKSUMS, verify_checksums
from lowra.linear import LowRALinear
from lowra.model_layers import lowra_layers, saved_linear

__all__ = ["load_merged", "load_peft", "load_quantized"]


def load_quantized(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    model: nn.Module | None = None,
    verify: bool = True,
) -> nn.Module:
    """Rebuild a model saved by ``save_quantized`` (HF folder) or ``save_quantized_legacy``.

    An HF folder is loaded with ``<architecture>.from_pretrained`` (``lowra.hf``'s quantizer:
    shard headers, tensor dtypes/shapes and finite tables are checked) and moved to ``device``, after
    ``lowra_checksums.json`` (every file) and every tensor's sha256 were checked (``verify``);
    ``model=`` applies to the legacy layout only. See ``_load_legacy`` for the
    legacy arguments. Returns the model in eval mode, with only the adapters trainable.
    Raises:
        FormatError (a ValueError): neither layout, or a broken or modified checkpoint.
    """
    from lowra.hf import is_lowra_hf_folder, verification, verify_folder

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no such directory: {directory}")
    if (directory / MANIFEST).is_file():
        return _load_legacy(directory, device, model, verify)
    if verify and (directory / CHECKSUMS).is_file():  # first: a changed config.json is refused naming it
        verify_checksums(directory)
    if not is_lowra_hf_folder(directory):
        config = directory / "config.json"
        what = ("a Hugging Face model folder whose config.json has no quantization_config with "
                "quant_method 'lowra'" if config.is_file() else f"neither an HF folder nor a {MANIFEST} layout")
        raise FormatError(f"{directory} is not a LowRA checkpoint ({what})")
    if model is not None:
        raise ValueError("load_quantized(model=...) applies to the legacy manifest layout only; "
                         "an HF-format checkpoint builds its own model")
    cls = _architecture(directory)
    if verify:  # every file and every tensor's bytes, before transformers builds anything
        verify_folder(directory)
    with verification(False):  # checked just above
        loaded = cls.from_pretrained(str(directory))
    loaded.to(device)
    return loaded


def _load_legacy(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    model: nn.Module | None = None,
    verify: bool = True,
) -> nn.Module:
    """Rebuild a model saved by ``save_quantized_legacy``, without re-quantizing anything.

    Args:
        directory: a directory written by ``save_quantized_legacy``.
        device: where to put every tensor.
        model: optional HF model to load into (its target linears must have the saved shapes);
            by default the model is rebuilt from the saved config (parameters are never
            allocated in fp32 for the quantized layers).
        verify: check every file's sha256 against the manifest (default). ``False`` skips the
            hashing (one extra read of every file) for speed on trusted storage; sizes,
            structure, shapes and finite codebooks/scales are checked either way.
    Returns the model in eval mode, with only the adapters trainable.
    Raises:
        FormatError (a ValueError): a foreign directory, a truncated, corrupt or modified file
            (sha256 mismatch), a NaN/Inf codebook or scale, a version this code does not read.
        ValueError: a ``model`` whose shapes differ from the save.
    """
    directory = Path(directory)
    manifest = read_manifest(directory, verify=verify)
    files = manifest["files"]
    quantized, _ = load_safetensors_checked(directory / files["quantized"], device)
    adapters, _ = load_safetensors_checked(directory / files["adapters"], device)
    rest, _ = load_safetensors_checked(directory / files["rest"], device)
    for key, source in manifest.get("tied", {}).items():
        if source not in rest:
            raise FormatError(f"tied tensor {key!r} refers to {source!r}, which is not in the checkpoint")
        rest[key] = rest[source]

    if model is None:
        config_dict = json.loads((directory / files["config"]).read_text())
        config = _config_class(config_dict.get("model_type")).from_dict(config_dict)
        model = _empty_model(_model_class(manifest["model_class"]), config)
    elif lowra_layers(model):
        raise ValueError("load_quantized needs a model with plain nn.Linear layers (this one is quantized)")

    for name, meta in manifest["layers"].items():
        shape = tuple(meta["shape"])
        saved_linear(model, name, shape)
        bias = rest.pop(f"{name}.bias", None)
        if meta["base"] == "quantized":
            prefix = f"{name}/"
            tensors = {k[len(prefix):]: v for k, v in quantized.items() if k.startswith(prefix)}
            tensors.pop("plan.bits", None)
            try:
                qt = QuantizedTensor.from_state_dict(tensors, meta["quantized"])
            except FormatError as exc:
                raise FormatError(f"layer {name!r}: {exc}") from None
            if qt.shape != shape:
                raise FormatError(f"layer {name!r}: stored codes have shape {qt.shape}, manifest says {shape}")
            base: QuantizedTensor | torch.Tensor = qt
        else:
            key = f"{name}.dense_weight"
            if key not in rest:
                raise FormatError(f"layer {name!r}: dense base {key!r} is missing from the checkpoint")
            base = rest.pop(key)
        lora_A = adapters.pop(f"{name}.lora_A", None)
        lora_B = adapters.pop(f"{name}.lora_B", None)
        if meta["rank"] and (lora_A is None or lora_B is None):
            raise FormatError(f"layer {name!r}: adapters are missing from the checkpoint")
        new = LowRALinear(
            base, bias=bias, rank=meta["rank"], alpha=meta["alpha"], dropout=meta.get("dropout", 0.0),
            adapter_dtype=lora_A.dtype if lora_A is not None else None, lora_A=lora_A, lora_B=lora_B,
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)

    if adapters:
        raise FormatError(f"adapters for unknown layers in the checkpoint: {sorted(adapters)[:5]}")
    expected = {k for k in model.state_dict() if not k.endswith((".lora_A", ".lora_B"))}
    expected -= {f"{n}.bias" for n, m in lowra_layers(model) if m.bias is not None}
    expected -= {f"{n}.dense_weight" for n, m in lowra_layers(model) if not m.is_quantized}
    missing, unexpected = expected - set(rest), set(rest) - expected
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit this model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    for key, value in rest.items():
        current = model.get_parameter(key) if _is_param(model, key) else model.get_buffer(key)
        if tuple(current.shape) != tuple(value.shape):
            raise ValueError(f"tensor {key!r} has shape {tuple(current.shape)} in this model but "
                             f"{tuple(value.shape)} in the checkpoint")
    model.load_state_dict(rest, strict=False, assign=True)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise FormatError(f"the checkpoint does not provide {leftover[:5]}")
    from lowra.model_layers import mark_only_lora_trainable

    model.to(device)
    mark_only_lora_trainable(model)
    model.eval()
    model.lowra_manifest = manifest
    if manifest.get("lowra_config") is not None:  # checkpoints before LowRAConfig have none
        from lowra.config import LowRAConfig

        try:
            model.lowra_config = LowRAConfig.from_dict(manifest["lowra_config"])
        except ValueError as exc:
            raise FormatError(f"{directory}: the manifest's lowra_config is not a valid LowRAConfig: {exc}") from None
    return model


def _is_param(model: nn.Module, key: str) -> bool:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return leaf in module._parameters


def load_merged(directory: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """A folder written by ``merge_to_hf`` (merged, or the dequantized base), its checksums checked first.

    ``lowra_checksums.json`` lists every file with its sha256 (``lowra.integrity``); plain
    ``from_pretrained`` reads the same folder without that check. ``verify=False`` skips it.
    Raises:
        FormatError: no or a broken manifest, a file changed, or not a merged folder.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no such directory: {directory}")
    if verify:
        verify_checksums(directory, kinds=("merged", "dequantized_base"))
    return _architecture(directory).from_pretrained(str(directory)).to(device).eval()


def _architecture(directory: Path) -> type:
    """The transformers class ``config.json``'s ``architectures`` names."""
    names = json.loads((directory / "config.json").read_text()).get("architectures") or []
    if not names:
        raise FormatError(f"{directory}/config.json names no architecture (\"architectures\")")
    return _model_class(names[0])


def load_peft(directory: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """An adapter folder written by ``export_peft_adapters`` on the base its ``adapter_config.json`` names.

    The adapter folder's checksums (its ``base/`` too, with ``include_base=True``) are checked first,
    and a named base folder with its own ``lowra_checksums.json`` is loaded with ``load_merged``;
    then PEFT applies the adapters (``PeftModel.from_pretrained``). Returns the PEFT model in eval mode.
    Raises:
        FormatError: a broken folder; a base that is no dequantized LowRA base is loaded with a warning
            by ``from_pretrained`` (nothing proves it fits).
    """
    from peft import PeftModel

    directory = Path(directory)
    if verify:
        verify_checksums(directory, kinds=("peft_adapter",))
    try:
        base_name = json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{directory}/adapter_config.json names no base_model_name_or_path: {exc!r}") from None
    if (Path(base_name) / CHECKSUMS).is_file():
        base = load_merged(base_name, device, verify)
    else:
        import warnings

        from transformers import AutoModelForCausalLM

        warnings.warn(f"load_peft: {base_name!r} is no dequantized base written by LowRA; nothing proves that the "
                      "adapters fit it", UserWarning, stacklevel=2)
        base = AutoModelForCausalLM.from_pretrained(base_name).to(device)
    return PeftModel.from_pretrained(base, str(directory)).to(device).eval()
