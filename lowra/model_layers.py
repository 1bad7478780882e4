"""Which linears a model quantizes, and its adapters afterwards.

``find_target_linears`` picks the ``nn.Linear`` layers to quantize (PEFT's ``target_modules``
semantics); ``lowra_layers`` / ``lora_parameters`` / ``mark_only_lora_trainable`` read and freeze
a quantized model.  Kept apart from :mod:`lowra.model_quantization` so that :mod:`lowra.calibration` can find
the targets without importing the quantization pipeline (no import cycle).
"""

from __future__ import annotations

import re

from torch import nn

from lowra.linear import LowRALinear

__all__ = [
    "DEFAULT_SKIP_MODULES",
    "DEFAULT_TARGET_MODULES",
    "find_target_linears",
    "lora_parameters",
    "lowra_layers",
    "mark_only_lora_trainable",
    "saved_linear",
    "set_module",
    "train_base_tables",
]

#: Default LoRA targets by ``config.model_type`` (QLoRA/LoftQ: every projection of every block).
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "bart": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
#: Linears never quantized unless targeted explicitly: the output head stays in full precision.
DEFAULT_SKIP_MODULES: tuple[str, ...] = ("lm_head",)


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def find_target_linears(
    model: nn.Module,
    target_modules: str | list[str] | tuple[str, ...] | None = None,
    skip_modules: tuple[str, ...] | list[str] = DEFAULT_SKIP_MODULES,
) -> list[tuple[str, nn.Linear]]:
    """The ``(name, nn.Linear)`` pairs to quantize, in module order.

    Args:
        target_modules: PEFT semantics — a list of names matching a module's full name or its
            suffix after a dot (``"q_proj"``), or one string used as a full-match regex. ``None``
            uses ``DEFAULT_TARGET_MODULES[config.model_type]``, or every linear for other models.
        skip_modules: suffixes never taken unless listed in ``target_modules`` explicitly.
    Raises:
        ValueError: a listed target that matches no ``nn.Linear`` (the message lists what exists),
            or a model that is already quantized.
    """
    if any(isinstance(m, LowRALinear) for m in model.modules()):
        raise ValueError("the model already contains LowRALinear layers (quantize_model was run before)")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear layers to quantize")
    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        target_modules = DEFAULT_TARGET_MODULES.get(model_type)
    if target_modules is None:
        chosen = [(n, m) for n, m in linears if not any(_matches(n, s) for s in skip_modules)]
    elif isinstance(target_modules, str):
        chosen = [(n, m) for n, m in linears if re.fullmatch(target_modules, n)]
        if not chosen:
            raise ValueError(f"target_modules regex {target_modules!r} matches no nn.Linear; "
                             f"linears are named e.g. {_examples(linears)}")
    else:
        targets = list(target_modules)
        for t in targets:
            if not any(_matches(n, t) for n, _ in linears):
                raise ValueError(f"target module {t!r} matches no nn.Linear in the model; "
                                 f"available: {_examples(linears)}")
        chosen = []
        for n, m in linears:
            hits = [t for t in targets if _matches(n, t)]
            skipped = any(_matches(n, s) for s in skip_modules)
            # a skipped linear (lm_head) is taken only when a target names it explicitly
            if hits and (not skipped or any(t == n or t in skip_modules for t in hits)):
                chosen.append((n, m))
    if not chosen:
        raise ValueError("no target layer left to quantize (all matches are in skip_modules)")
    return chosen


def _examples(linears: list[tuple[str, nn.Module]]) -> list[str]:
    short = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
    return short[:20]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) of ``model`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def saved_linear(model: nn.Module, name: str, shape: tuple[int, int] | list[int],
                 error: type[ValueError] = ValueError) -> nn.Linear:
    """The ``nn.Linear`` of ``model`` that a checkpoint's layer ``name`` (stored ``shape`` ``(out, in)``)
    replaces on load: ``error`` (a ValueError class) when it is missing, not an ``nn.Linear``, or of
    another shape."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise error(f"the checkpoint's layer {name!r} does not exist in this model") from None
    if not isinstance(old, nn.Linear):
        raise error(f"the checkpoint's layer {name!r} is a {type(old).__name__} here, not nn.Linear")
    if [old.out_features, old.in_features] != list(shape):
        raise error(f"layer {name!r} has shape {[old.out_features, old.in_features]} in this model but "
                    f"{list(shape)} in the checkpoint (another model size?)")
    return old


def lowra_layers(model: nn.Module) -> list[tuple[str, LowRALinear]]:
    """Every ``(name, LowRALinear)`` of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LowRALinear)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (every ``lora_A`` / ``lora_B``), e.g. for the optimizer."""
    params = []
    for _, m in lowra_layers(model):
        if m.rank:
            params += [m.lora_A, m.lora_B]
    return params


def mark_only_lora_trainable(model: nn.Module) -> int:
    """Freeze everything but the adapters; returns the number of trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return sum(p.numel() for p in params)


def train_base_tables(model: nn.Module, codebooks: bool = False, scales: bool = False) -> dict[str, nn.Parameter]:
    """Make every quantized layer's codebooks and/or group scales trainable
    (``LowRALinear.train_base_tables``); returns the new parameters by their ``named_parameters`` name
    (e.g. ``….q_proj.trainable_codebooks.0``, ``….q_proj.trainable_absmax``). Codes stay frozen."""
    new: dict[str, nn.Parameter] = {}
    for name, m in lowra_layers(model):
        made = {id(p) for p in m.train_base_tables(codebooks, scales)}
        new.update({f"{name}.{k}": p for k, p in m.named_parameters() if id(p) in made})
    return new
