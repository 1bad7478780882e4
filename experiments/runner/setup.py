"""The runner's configuration turned into objects: device, tokenizer, model, the ``LowRAConfig`` and the
keyword arguments of ``lowra.quantize_model`` / ``lowra.quantize_pretrained``, calibration windows.

Used by :mod:`experiments.runner.run` (which re-exports these names), :mod:`experiments.eval.loading`
and the other entry points that load and quantize a model exactly as the runner does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from experiments.runner.config_check import ConfigError, resolve_path, streamable
from experiments.runner.data import LMData
from experiments.runner.hub import hub_access
from lowra.config import INIT_FIELDS, LOWRA_ONLY

log = logging.getLogger("experiments.run")

#: ``quant.<key>`` read for ``quant.method=lowra`` only.
LOWRA_KEYS = LOWRA_ONLY
#: ``quant.<key>`` read for every quantizing method: the adapter init.
INIT_KEYS = INIT_FIELDS


class ModelUnavailableError(RuntimeError):
    """A model that cannot be loaded (offline Hub, missing directory), with how to fix it."""


# ----------------------------------------------------------------------------------------- helpers


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)


def model_location(mcfg: Any) -> str:
    return str(resolve_path(mcfg.pretrained)) if mcfg.source == "local" else str(mcfg.pretrained)


def load_tokenizer(mcfg: Any) -> Any:
    from transformers import AutoTokenizer

    where = model_location(mcfg)
    with hub_access(str(mcfg.source)) as reason:  # no network: the local cache only, at once
        try:
            return AutoTokenizer.from_pretrained(where, trust_remote_code=bool(mcfg.trust_remote_code))
        except (OSError, ValueError) as exc:  # ValueError: a directory without tokenizer files
            raise ModelUnavailableError(_model_hint(mcfg, where, exc, reason)) from exc


def _model_hint(mcfg: Any, where: str, exc: BaseException, reason: str | None = None) -> str:
    why = (f"{reason}, and it is not in the local Hugging Face cache" if reason
           else f"{type(exc).__name__}: {exc}")
    return (
        f"model={mcfg.name}: could not load '{where}' ({why}). Offline or gated? "
        f"Download it elsewhere and point the config at the directory: "
        f"model.pretrained=/path/to/{mcfg.name} model.source=local"
    )


def load_model(mcfg: Any, device: torch.device) -> torch.nn.Module:
    """The pretrained HF model in ``model.dtype`` on ``device`` (or placed by ``device_map``)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForCausalLM if mcfg.arch == "causal_lm" else AutoModelForSeq2SeqLM
    where = model_location(mcfg)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, mcfg.dtype), "trust_remote_code": bool(mcfg.trust_remote_code)}
    if mcfg.device_map is not None and device.type == "cuda":
        kwargs["device_map"] = mcfg.device_map
    with hub_access(str(mcfg.source)) as reason:
        try:
            model = cls.from_pretrained(where, **kwargs)
        except OSError as exc:
            raise ModelUnavailableError(_model_hint(mcfg, where, exc, reason)) from exc
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    return model


def apply_checkpointing(model: torch.nn.Module, mcfg: Any) -> None:
    """``model.gradient_checkpointing``: each decoder layer keeps only its input in the forward and
    recomputes the rest in the backward (non-reentrant ``torch.utils.checkpoint``: the LowRA layers' eager
    autograd path, ``lut_linear_autograd``, runs again in the recomputation; same gradients)."""
    if not mcfg.gradient_checkpointing:
        return
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    model.config.use_cache = False


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate the quantized base alone: the LoRA branch of every adapted layer scaled by 0."""
    saved = [(m, m.scaling) for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")]
    try:
        for m, _ in saved:
            m.scaling = 0.0
        yield
    finally:
        for m, s in saved:
            m.scaling = s


def lowra_config(cfg: Any) -> Any:
    """The ``lowra.LowRAConfig`` of the ``quant`` / ``lora`` / ``model`` groups: one Hydra key per field
    (``LowRAConfig.from_hydra``, table ``lowra.config.HYDRA_KEYS``); what ``quantize_model`` runs with
    and what ``results.json`` (``lowra_config``) and the saved model record."""
    from lowra.config import LowRAConfig

    return LowRAConfig.from_hydra(cfg)


def quantize_kwargs(cfg: Any, progress: bool) -> dict[str, Any]:
    """``lowra_config(cfg)`` as keyword arguments of ``lowra.quantize_model`` (its shortcut form).

    LowRA's own switches (``LOWRA_KEYS``) only for ``quant.method=lowra``, the adapter init
    (``INIT_KEYS``) only for quantizing methods; ``quant_options`` (``quant.options`` without the
    runner's ``calibration`` recipe) flattened, as ``quantize_model(**options)`` takes them.
    """
    config = lowra_config(cfg)
    kw: dict[str, Any] = config.field_values()  # flat: the method's options among the common fields
    options = kw.pop("quant_options")
    method = config.method_object  # its own fields only; the init fields for quantizing methods only
    for key in (*(k for k in LOWRA_KEYS if k not in method.fields), *(INIT_KEYS if not method.quantizes else ())):
        kw.pop(key)
    kw.update(options)
    kw["progress"] = progress
    return kw


def needs_calibration(cfg: Any) -> bool:
    """Calibration windows are built from ``quant.options.calibration: {samples, seq_len, batch_size}``
    for a quantizer that needs them (OPTQ / ModuLoRA), LowRA's data-driven error tables
    (``quant.error=fisher|kfac|measured`` with a plan), Fisher-weighted codebooks and the calibrated
    adapter init (``quant.init=calibrated``) — the same rule as ``lowra.quantize_model``'s."""
    if not isinstance(cfg.quant.options.get("calibration"), Mapping):
        return False
    config = lowra_config(cfg)
    return config.method_object.needs(config).any


def use_streaming(cfg: Any, device: torch.device) -> bool:
    """``quant.stream``: true/false as set; ``auto`` streams when the full-precision model (its
    safetensors in ``model.dtype``) would not fit in 90 % of the device's free memory (host
    MemAvailable on CPU) and the config is streamable (:func:`streamable`)."""
    mode = cfg.quant.get("stream", "auto")
    if mode is False or str(mode).lower() == "false":
        return False
    why = streamable(cfg)
    if mode is True or str(mode).lower() == "true":
        if why is not None:
            raise ConfigError(f"quant.stream=true but {why}; use quant.stream=false (or auto)")
        return True
    if why is not None:
        return False
    from lowra.streaming import checkpoint_bytes, source_checkpoint

    try:
        with hub_access(str(cfg.model.source)):
            need = checkpoint_bytes(source_checkpoint(model_location(cfg.model)), getattr(torch, cfg.model.dtype))
    except (ValueError, OSError) as exc:  # no local safetensors (e.g. .bin only): load it the usual way
        log.info("quant.stream=auto: cannot size the checkpoint (%s); loading it in memory", exc)
        return False
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        from lowra.streaming import available_host_memory

        free = available_host_memory()
    stream = need > 0.9 * free
    log.info("quant.stream=auto: the full-precision model needs %.2f GB, %.2f GB free on %s: %s",
             need / 1e9, free / 1e9, device, "streaming quantization" if stream else "in memory")
    return stream


def stream_kwargs(cfg: Any, progress: bool, device: torch.device, data: Any = None) -> dict[str, Any]:
    """Keyword arguments of ``lowra.quantize_pretrained(src, out, **kw)``: the same ``LowRAConfig``
    and calibration windows as ``quantize_model`` gets (``data``: the run's ``LMData``), plus how the
    checkpoint is read (dtype, device, arch, trust_remote_code)."""
    kw: dict[str, Any] = {"config": lowra_config(cfg), "progress": progress}
    if needs_calibration(cfg):
        kw["calibration"] = calibration_kwargs(cfg, data)["calibration"]
    kw.update(dtype=str(cfg.model.dtype), device=str(device), arch=str(cfg.model.arch),
              trust_remote_code=bool(cfg.model.trust_remote_code))
    return kw


def calibration_kwargs(cfg: Any, data: Any) -> dict[str, Any]:
    """Replace ``options.calibration`` by real windows of the fine-tuning stream.

    Contract with ``lowra.quantize_model``: ``calibration`` = int64 ``[samples, seq_len]`` token
    windows (``lowra.calibration.calibration_windows`` of the training stream, seeded by
    ``seed``) and ``calibration_batch_size``; the quantizer collects its layer statistics from them.
    """
    from lowra.calibration import calibration_windows

    spec = cfg.quant.options.calibration
    if not isinstance(data, LMData) or data.train_ids is None:
        raise ConfigError(f"quant={cfg.quant.name} needs calibration text: data={cfg.data.name} has no training stream")
    windows = calibration_windows(data.train_ids, int(spec.samples), int(spec.seq_len), seed=int(cfg.seed))
    return {"calibration": windows, "calibration_batch_size": int(spec.get("batch_size", 16))}


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that require grad, by name: the adapters, and the base's codebooks / scales when
    ``train.codebooks`` / ``train.scales`` made them trainable (``train_base_tables``); the codes and
    the rest of the frozen base are left out."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train_base_tables(model: torch.nn.Module, tcfg: Any) -> tuple[dict[str, float], frozenset[str]]:
    """``train.codebooks`` / ``train.scales`` = trainable: make the quantized layers' codebooks / group
    scales parameters (``lowra.model_layers.train_base_tables``; codes stay frozen). Returns ``(param_lrs,
    no_decay)`` for ``train``: each new parameter's learning rate (``train.codebook_lr`` /
    ``train.scale_lr``) and their names (trained without weight decay). Both empty when frozen."""
    from lowra.model_layers import train_base_tables as make_trainable

    codebooks = tcfg.get("codebooks", "frozen") == "trainable"
    scales = tcfg.get("scales", "frozen") == "trainable"
    new = make_trainable(model, codebooks=codebooks, scales=scales)
    lrs = {n: float(tcfg.scale_lr if n.endswith("trainable_absmax") else tcfg.codebook_lr) for n in new}
    if new:
        log.info("train: %d codebook/scale tensors trainable (%d values)", len(new),
                 sum(p.numel() for p in new.values()))
    return lrs, frozenset(new)
