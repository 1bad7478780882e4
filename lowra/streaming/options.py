"""The options of streaming quantization: the same ``LowRAConfig`` as ``quantize_model``, and what cannot stream.

``stream_settings`` builds and validates the :class:`~lowra.config.LowRAConfig` of a
``quantize_pretrained`` call exactly as ``quantize_model`` does (``config_from_arguments``, then
``lowra.stages.resolve_settings``: same candidates, iterations, plan switch), so a streamed
checkpoint records the same ``lowra_config`` as an in-memory one; it then refuses the settings
that need calibration data through the whole model. ``fingerprint`` is what a resumed run must
match.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from lowra.config import config_from_arguments
from lowra.stages import METHOD_NONE, Settings, resolve_settings
from lowra.streaming.source import _Source

__all__ = ["fingerprint", "stream_settings"]

_UNSTREAMABLE = ("it needs calibration data through the whole model in memory; use lowra.quantize_model "
                 "on the loaded model (or a data-free setting: quant.error=sse|relative, quant.init=loftq)")


def stream_settings(options: dict[str, Any], backend: str, progress: bool) -> Settings:
    """The resolved settings of ``quantize_pretrained``'s options (``quantize_model``'s keyword form).

    ``options``: ``LowRAConfig`` fields by name (``use_plan=False`` = ``plan="uniform"``) and the
    quantizer's extra options, as ``quantize_model(model, **options)`` takes them.  A bad option is
    the ValueError ``LowRAConfig`` raises (naming the field); an unstreamable one (``method="none"``,
    a data-driven error table, Fisher-weighted codebooks, ``init="calibrated"``, a quantizer that
    needs calibration Hessians) a ValueError saying to use ``quantize_model``.
    """
    from lowra.error_tables import DATA_TABLES

    if options.get("method") == METHOD_NONE:
        raise ValueError("method='none' keeps the dense bases: there is nothing to stream-quantize; "
                         "load the model with from_pretrained and use lowra.quantize_model")
    config, runtime = config_from_arguments(None, options)
    s = resolve_settings(config, backend=backend, progress=progress, quant_options=runtime)
    if s.with_plan and s.error in DATA_TABLES:
        raise ValueError(f"streaming quantization cannot compute quant.error={s.error}: {_UNSTREAMABLE}")
    if s.fisher_codebooks:
        raise ValueError(f"streaming quantization cannot fit Fisher-weighted codebooks: {_UNSTREAMABLE}")
    if s.calibrated_init:
        raise ValueError(f"streaming quantization cannot run quant.init=calibrated: {_UNSTREAMABLE}")
    if s.needs_calibration:
        raise ValueError(f"method {s.method!r} needs calibration Hessians; streaming quantization "
                         f"cannot provide them: {_UNSTREAMABLE}")
    return s


def fingerprint(s: Settings, extra: dict[str, Any], src: _Source, targets: list[str]) -> str:
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

    runtime = {k: v for k, v in s.quant_options.items() if k not in s.config.quant_options}
    blob = json.dumps({"config": s.config.to_dict(), "opts": plain({**extra, "quant_options": runtime}),
                       "source": src.fingerprint(), "targets": targets}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
