"""The options of streaming quantization: the same ``LowRAConfig`` as ``quantize_model``, and what cannot stream.

``stream_settings`` resolves the :class:`~lowra.config.LowRAConfig` of a ``quantize_pretrained``
call exactly as ``quantize_model`` does (``lowra.pipeline.resolve_settings``: same candidates,
iterations, plan switch), so a streamed checkpoint records the same ``lowra_config`` as an
in-memory one; it refuses what the method says cannot stream. ``fingerprint`` is what a resumed
run must match.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from lowra.config import LowRAConfig
from lowra.methods import unstreamable
from lowra.pipeline import Settings, resolve_settings
from lowra.streaming.source import ShardReader

__all__ = ["fingerprint", "stream_settings"]

def stream_settings(config: LowRAConfig, runtime: dict[str, Any], backend: str, progress: bool) -> Settings:
    """The resolved settings of a ``quantize_pretrained`` call: ``quantize_model``'s for the same
    ``LowRAConfig`` (``runtime``: the call's non-JSON quantizer options), or a ValueError saying why
    the config cannot stream (``lowra.methods.unstreamable``)."""
    settings = resolve_settings(config, backend=backend, progress=progress, quant_options=runtime)
    why = unstreamable(settings.config)
    if why is not None:
        raise ValueError(f"streaming quantization: {why}")
    return settings


def fingerprint(settings: Settings, extra: dict[str, Any], src: ShardReader, targets: list[str]) -> str:
    """sha256 of the config, the other result-changing options (``extra``: dtype, arch, backend,
    non-JSON quantizer options), the source shards (names, sizes, mtimes) and the target names."""
    def plain(v: Any) -> Any:
        if isinstance(v, torch.dtype):
            return str(v)
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in sorted(v.items())}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if isinstance(v, (str, int, float, bool)) or v is None else repr(v)

    runtime = {k: v for k, v in settings.quant_options.items() if k not in settings.config.quant_options}
    blob = json.dumps({"config": settings.config.to_dict(), "opts": plain({**extra, "quant_options": runtime}),
                       "source": src.fingerprint(), "targets": targets}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
