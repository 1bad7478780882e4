"""The source of streaming quantization: a safetensors checkpoint read one tensor at a time.

``ShardReader`` maps every tensor name to its shard (one file or an index of shards) and loads one
tensor as a private CPU copy (the shard is mapped only while it is read); ``skeleton`` builds the
model from its config on the meta device; ``group_blocks`` groups the target layers by transformer block
(the unit of work and of resume).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ShardReader", "checkpoint_bytes", "group_blocks", "skeleton", "source_checkpoint", "source_key"]

_INDEX = "model.safetensors.index.json"


class ShardReader:
    """A safetensors checkpoint (one file or an index of shards) read one tensor at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / _INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{index} is not a safetensors index (no weight_map): {exc}") from None
            self.key_file = {str(k): str(v) for k, v in weight_map.items()}
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise ValueError(
                    f"{directory} has no safetensors checkpoint (model.safetensors or {_INDEX}); streaming "
                    "quantization reads safetensors only (convert .bin checkpoints with save_pretrained first)"
                )
            from safetensors import safe_open

            self.key_file = {}
            for name in files:
                with safe_open(str(directory / name), framework="pt") as f:
                    for k in f.keys():
                        self.key_file[k] = name
        for name in set(self.key_file.values()):
            if not (directory / name).is_file():
                raise ValueError(f"the checkpoint index names shard {name}, which is missing from {directory}")

    def files(self) -> list[str]:
        return sorted(set(self.key_file.values()))

    def fingerprint(self) -> dict[str, Any]:
        """Names, sizes and modification times of the shards (a changed source is not resumed)."""
        return {n: [(self.directory / n).stat().st_size, int((self.directory / n).stat().st_mtime)]
                for n in self.files()}

    def load(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor as a private CPU copy (the shard is mapped only while it is read)."""
        from safetensors import safe_open

        if key not in self.key_file:
            raise ValueError(f"tensor {key!r} is not in the checkpoint at {self.directory}")
        with safe_open(str(self.directory / self.key_file[key]), framework="pt", device="cpu") as f:
            t = f.get_tensor(key)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def numel(self) -> int:
        """Total number of elements of every tensor (read from the headers only)."""
        from safetensors import safe_open

        total = 0
        by_file: dict[str, list[str]] = {}
        for k, f in self.key_file.items():
            by_file.setdefault(f, []).append(k)
        for name, keys in by_file.items():
            with safe_open(str(self.directory / name), framework="pt") as f:
                for k in keys:
                    n = 1
                    for d in f.get_slice(k).get_shape():
                        n *= int(d)
                    total += n
        return total


def source_checkpoint(model: str | os.PathLike) -> Path:
    """The local directory of a checkpoint: ``model`` itself, or a Hub id resolved through the cache.

    A Hub id is fetched with ``huggingface_hub.snapshot_download`` (configs and safetensors only;
    ``HF_HUB_OFFLINE=1`` uses the local cache only).
    """
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{model} is a file; quantize_pretrained needs a model directory or a Hub id")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors"])
    except Exception as exc:
        raise ValueError(f"{model!r} is neither a directory nor an available Hub model: {exc}") from exc
    return Path(local)


def checkpoint_bytes(model: str | os.PathLike, dtype: torch.dtype | None = None) -> int:
    """Bytes of the full-precision model in ``dtype`` (default: as stored), from the shard headers.

    What loading the model would take (the runner's ``quant.stream=auto`` compares it with the device).
    """
    directory = source_checkpoint(model)
    src = ShardReader(directory)
    if dtype is None:
        return sum((directory / n).stat().st_size for n in src.files())
    return src.numel() * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------- skeleton
def skeleton(directory: Path, arch: str, dtype: torch.dtype | None, trust_remote_code: bool) -> nn.Module:
    """The model built from its config with every tensor on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if arch not in ("causal_lm", "seq2seq"):
        raise ValueError(f"arch must be 'causal_lm' or 'seq2seq', got {arch!r}")
    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    cls = AutoModelForCausalLM if arch == "causal_lm" else AutoModelForSeq2SeqLM
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    with torch.device("meta"):
        model = cls.from_config(config, **kwargs)
    model.name_or_path = str(directory)
    return model


def block_of(name: str) -> str:
    """The transformer block holding a layer: its name up to the first numeric component."""
    m = re.match(r"^(.*?\.\d+)(\.|$)", name)
    return m.group(1) if m else name


def group_blocks(names: list[str]) -> list[tuple[str, list[str]]]:
    """Consecutive target names grouped by block, in module order."""
    out: list[tuple[str, list[str]]] = []
    for n in names:
        b = block_of(n)
        if out and out[-1][0] == b:
            out[-1][1].append(n)
        else:
            out.append((b, [n]))
    return out


def source_key(model: nn.Module, src: ShardReader, key: str) -> str:
    """The checkpoint's name of the model's tensor ``key`` (with or without the base-model prefix)."""
    if key in src.key_file:
        return key
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in src.key_file:
        return key[len(prefix) + 1:]
    if prefix and f"{prefix}.{key}" in src.key_file:
        return f"{prefix}.{key}"
    raise ValueError(f"tensor {key!r} of the model is not in the checkpoint at {src.directory} "
                     f"(it has e.g. {sorted(src.key_file)[:5]})")
