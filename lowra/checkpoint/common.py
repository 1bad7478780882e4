"""What the checkpoint modules share: file names, the format constants, tied-tensor and meta-device helpers,
the atomic directory swap."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowra.atomic import dir_mode
from lowra.format import (
    FormatError,
)
from lowra.model_layers import lowra_layers

__all__ = ["ADAPTER_DIR", "DEFAULT_MAX_SHARD_SIZE", "MANIFEST", "MODEL_FORMAT", "MODEL_FORMAT_VERSION", "REPORT_FILE"]

MANIFEST = "manifest.json"
ADAPTER_DIR = "adapter"  # PEFT copy of the adapters inside a saved folder (not at its root: see lowra.hf)
REPORT_FILE = "lowra_report.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
MODEL_FORMAT = "lowra.model"
MODEL_FORMAT_VERSION = 1
_DATA_FILE = re.compile(r"^(config|quantized|adapters|rest)\.[0-9a-f]{12}\.(json|safetensors)$")

# ---------------------------------------------------------------------------------- helpers
def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _source_model(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def _dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one copy of tensors that share storage (tied embeddings); return ``aliases``."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for key, t in state.items():
        ident = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            unique[key] = t.detach().contiguous()
    return unique, aliases


def _split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(adapters, rest)`` of ``model.state_dict()``: LoRA factors vs everything else."""
    adapter_keys = set()
    for name, m in lowra_layers(model):
        if m.rank:
            adapter_keys |= {f"{name}.lora_A", f"{name}.lora_B"}
    state = model.state_dict()
    adapters = {k: v for k, v in state.items() if k in adapter_keys}
    rest = {k: v for k, v in state.items() if k not in adapter_keys}
    return adapters, rest


@contextlib.contextmanager
def _params_on_meta():
    """Build modules with parameters on the meta device (no memory), buffers where they belong.

    Non-persistent buffers (e.g. rotary ``inv_freq``) are computed normally, which a plain
    ``torch.device("meta")`` context would lose; parameters are filled later with ``assign=True``.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _config_class(model_type: str):
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise FormatError(f"unknown model_type {model_type!r} in the saved config")
    return CONFIG_MAPPING[model_type]


def _model_class(name: str):
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None or not isinstance(cls, type):
        raise FormatError(f"unknown model class {name!r} in the manifest (transformers has no such class)")
    return cls


def _empty_model(cls, config) -> nn.Module:
    with _params_on_meta():
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    return model


@contextlib.contextmanager
def _atomic_dir(path: str | os.PathLike):
    """Yield a temp dir beside ``path``; on success it replaces ``path`` (old one removed last)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, dir_mode())  # mkdtemp makes 0700; a finished directory gets os.mkdir's mode
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _dense_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point() and not any(p is q for q in _lora_params(model)):
            return p.dtype
    return torch.float32


def _lora_params(model: nn.Module) -> list[torch.Tensor]:
    from lowra.model_layers import lora_parameters

    return lora_parameters(model)


def _most_common(values: list) -> Any:
    return Counter(values).most_common(1)[0][0]
