"""Stage 6 of ``quantize_model``: quantize + pack every target layer, init its adapters, swap it in.

One layer at a time (:func:`quantize_layers`): :func:`layer_quantizer` is the layer's
``[out, in] → QuantizedTensor`` (its plan's widths and codebooks fixed, or one integer width for the
other methods), :func:`init_adapters` runs LoftQ (or the calibrated init) with it, and the
``nn.Linear`` is replaced by a ``LowRALinear`` and dropped at once.  The stages before it are in
:mod:`lowra.pipeline`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowra.adapter_init import ActivationWhitening, LoftQResult, loftq_init
from lowra.format import QuantizedTensor
from lowra.linear import LowRALinear
from lowra.model_layers import set_module
from lowra.pipeline import Calibration, Settings
from lowra.progress import progress as layer_progress
from lowra.report import LayerReport, QuantizationReport

__all__ = ["init_adapters", "layer_quantizer", "module_kwargs", "quantize_layer", "quantize_layers"]


def quantize_layers(model: nn.Module, targets: list[tuple[str, nn.Linear]], settings: Settings,
                    layer_bits: dict[str, torch.Tensor], codebooks: dict[str, dict[int, torch.Tensor]],
                    calib: Calibration, report: QuantizationReport) -> list[LayerReport]:
    """Stage 6, one layer at a time: quantize + pack, init the adapters, swap in a ``LowRALinear``.

    The ``nn.Linear`` is dropped as soon as its replacement exists.  ``method="none"``: a frozen
    dense base and the standard LoRA init.  Times go to ``report.times`` (quantizer calls inside
    LoftQ count as ``quantize_s``, the rest as ``loftq_s``).
    """
    layer_reports = []
    for name, linear in layer_progress(targets, f"quantize ({settings.method})", settings.progress):
        if not settings.method_object.quantizes:
            new = LowRALinear.from_linear(linear, **module_kwargs(settings))
            layer_reports.append(LayerReport(name, tuple(linear.weight.shape), {}, new.nominal_bits,
                                             new.effective_bits, 0.0, 0.0))
        else:
            bias = linear.bias.detach() if linear.bias is not None else None
            new, layer_report = quantize_layer(name, linear.weight.detach(), bias, settings, layer_bits.get(name),
                                               codebooks.pop(name, None), calib, report.times)
            layer_reports.append(layer_report)
        new.train(linear.training)
        set_module(model, name, new)
        del linear
    return layer_reports


def module_kwargs(settings: Settings) -> dict[str, Any]:
    """``LowRALinear`` keyword arguments of every adapted layer."""
    return dict(rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout,
                adapter_dtype=settings.adapter_dtype, backend=settings.backend)


def quantize_layer(name: str, weight: torch.Tensor, bias: torch.Tensor | None, settings: Settings,
                   bits_per_row: torch.Tensor | None, codebooks: dict[int, torch.Tensor] | None, calib: Calibration,
                   times: dict[str, float]) -> tuple[LowRALinear, LayerReport]:
    """One layer of stage 6, in memory and streamed alike: quantize + pack ``weight [out, in]`` (the
    plan's widths and codebooks, or the method's one width), init the adapters (LoftQ or the
    calibrated init with the layer's input Gram) and build its ``LowRALinear``; quantizer and init
    seconds are added to ``times["quantize_s"]`` / ``times["loftq_s"]``."""
    quantize_fn = layer_quantizer(settings, name, bits_per_row, codebooks, weight.device,
                                  importance=calib.fisher.pop(name, None) if settings.fisher_codebooks else None,
                                  hessian=calib.hessians.get(name) if settings.needs.layer_hessians else None)
    hessian = calib.hessians.pop(name, None) if settings.calibrated_init and settings.loftq_iters > 0 else None
    if hessian is not None and tuple(hessian.shape) == (weight.shape[1],) * 2:  # (a wrong shape: loftq_init says so)
        hessian = ActivationWhitening(hessian, settings.init_damp, f"layer {name!r}")  # the float64 Gram is freed here
    result, quantize_s, loftq_s = timed_init(quantize_fn, lambda fn: init_adapters(name, weight, fn, settings, hessian))
    times["quantize_s"] += quantize_s
    times["loftq_s"] += loftq_s
    qt = result.qweight
    new = LowRALinear(qt, bias=bias, lora_A=result.lora_A, lora_B=result.lora_B, **module_kwargs(settings))
    hist = Counter(qt.bits_per_row.tolist())
    layer_report = LayerReport(name, tuple(weight.shape), {int(k): int(v) for k, v in sorted(hist.items())},
                               qt.nominal_bits, qt.effective_bits, result.sse_quant, result.sse, result.best_iter)
    return new, layer_report


def timed_init(
    quantize_fn: Callable[[torch.Tensor], QuantizedTensor],
    init: Callable[[Callable[[torch.Tensor], QuantizedTensor]], Any],
) -> tuple[Any, float, float]:
    """``init(quantize_fn)`` (a LoftQ-style init calling the quantizer), timed apart.

    Returns ``(result, seconds in quantize_fn, seconds in the rest of init)``.
    """
    spent = 0.0

    def timed(m: torch.Tensor) -> QuantizedTensor:
        nonlocal spent
        t = time.perf_counter()
        out = quantize_fn(m)
        spent += time.perf_counter() - t
        return out

    t0 = time.perf_counter()
    result = init(timed)
    return result, spent, time.perf_counter() - t0 - spent


def init_adapters(name: str, weight: torch.Tensor, quantize_fn: Callable[[torch.Tensor], QuantizedTensor],
                  settings: Settings, hessian: torch.Tensor | ActivationWhitening | None) -> LoftQResult:
    """The quantized base and adapters of one layer: ``loftq_init`` with the quantizer fixed
    (``loftq_iters`` alternations; 0 = standard LoRA init; ``hessian`` = the calibrated init's
    input Gram ``[in, in]`` or its whitening, None for LoftQ)."""
    return loftq_init(weight, quantize_fn, settings.rank, settings.alpha, iters=settings.loftq_iters,
                      name=f"layer {name!r}",
                      hessian=hessian, damp=settings.init_damp)


def layer_quantizer(settings: Settings, name: str, bits_per_row: torch.Tensor | None,
                    codebooks: dict[int, torch.Tensor] | None, device: torch.device,
                    importance: torch.Tensor | None = None,
                    hessian: torch.Tensor | None = None) -> Callable[[torch.Tensor], QuantizedTensor]:
    """The ``[out, in] → QuantizedTensor`` (quantize + pack) the adapter init uses for layer ``name``:
    the method's (:meth:`lowra.methods.Method.layer_quantizer`), with the plan's widths and
    codebooks (``bits_per_row``/``codebooks``; None without a plan), the call's quantizer options
    merged with the layer's (``settings.layer_options[name]``, consumed), ``importance`` (Fisher
    diagonal, LowRA without a plan and ``fisher_codebooks``) and, for a quantizer that takes
    calibration Hessians (OPTQ), the layer's input Gram ``hessian`` unless its options hold one."""
    options = {**settings.quant_options, **settings.layer_options.pop(name, {})}
    if settings.needs.layer_hessians and options.get("hessian") is None and options.get("inputs") is None:
        if hessian is None:
            raise ValueError(f"method {settings.method!r} needs calibration Hessians: layer {name!r} has none")
        options["hessian"] = hessian
    return settings.method_object.layer_quantizer(
        settings.config, bits_per_row=bits_per_row, codebooks=codebooks, device=device, backend=settings.backend,
        options=options, importance=importance, relearn=settings.init_codebooks == "relearn")
