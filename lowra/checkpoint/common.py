"""What the checkpoint modules share: file names, the meta-device model builder, the atomic directory swap."""

from __future__ import annotations

import contextlib
import os
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

__all__ = ["ADAPTER_DIR", "DEFAULT_MAX_SHARD_SIZE", "REPORT_FILE", "VERSION1_MANIFEST"]

#: the file that marks a folder of the removed version-1 layout (``load_quantized`` refuses it)
VERSION1_MANIFEST = "manifest.json"
ADAPTER_DIR = "adapter"  # PEFT copy of the adapters inside a saved folder (not at its root: see lowra.hf)
REPORT_FILE = "lowra_report.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")

# ---------------------------------------------------------------------------------- helpers
def _source_model(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


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


def _model_class(name: str):
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None or not isinstance(cls, type):
        raise FormatError(f"unknown model class {name!r} in config.json (transformers has no such class)")
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
