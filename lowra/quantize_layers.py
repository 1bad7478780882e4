"""Stage 6 of ``quantize_model``: quantize + pack every target layer, init its adapters, swap it in.

One layer at a time (:func:`quantize_layers`): :func:`layer_quantizer` is the layer's
``[out, in] → QuantizedTensor`` (its plan's widths and codebooks fixed, or one integer width for the
other methods), :func:`init_adapters` runs LoftQ (or the calibrated init) with it, and the
``nn.Linear`` is replaced by a ``LowRALinear`` and dropped at once.  The stages before it are in
:mod:`lowra.stages`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowra.format import QuantizedTensor
from lowra.layers import set_module
from lowra.loftq import LoftQResult, loftq_init
from lowra.nn import LowRALinear
from lowra.report import LayerReport, QuantizationReport
from lowra.stages import METHOD_NONE, Calibration, Settings, _integer_bits, _progress

__all__ = ["init_adapters", "layer_quantizer", "quantize_layers"]


def quantize_layers(model: nn.Module, targets: list[tuple[str, nn.Linear]], s: Settings,
                    layer_bits: dict[str, torch.Tensor], codebooks: dict[str, dict[int, torch.Tensor]],
                    calib: Calibration, report: QuantizationReport) -> list[LayerReport]:
    """Stage 6, one layer at a time: quantize + pack, init the adapters, swap in a ``LowRALinear``.

    The ``nn.Linear`` is dropped as soon as its replacement exists.  ``method="none"``: a frozen
    dense base and the standard LoRA init.  Times go to ``report.times`` (quantizer calls inside
    LoftQ count as ``quantize_s``, the rest as ``loftq_s``).
    """
    times = report.times
    module_kw = dict(rank=s.rank, alpha=s.alpha, dropout=s.dropout, adapter_dtype=s.adapter_dtype, backend=s.backend)
    layer_reports = []
    for name, linear in _progress(targets, f"quantize ({s.method})", s.progress):
        weight = linear.weight.detach()
        if s.method == METHOD_NONE:
            new = LowRALinear.from_linear(linear, **module_kw)
            layer_reports.append(LayerReport(name, tuple(weight.shape), {}, new.nominal_bits,
                                             new.effective_bits, 0.0, 0.0))
        else:
            quantize_fn = layer_quantizer(
                s.method, layer_bits.get(name), codebooks.pop(name, None), s.bits, s.group_size,
                s.double_quant, s.codebook_iters, s.weight_power, s.backend, weight.device,
                {**s.quant_options, **s.layer_options.pop(name, {})},
                importance=calib.fisher.pop(name, None) if s.fisher_codebooks else None,
                relearn=s.init_codebooks == "relearn",
            )
            hessian = calib.hessians.pop(name, None) if s.calibrated_init else None
            result, quantize_s, loftq_s = timed_init(
                quantize_fn, lambda fn, n=name, w=weight, h=hessian: init_adapters(n, w, fn, s, h))
            times["quantize_s"] += quantize_s
            times["loftq_s"] += loftq_s
            qt = result.qweight
            new = LowRALinear(
                qt, bias=linear.bias.detach() if linear.bias is not None else None,
                lora_A=result.lora_A, lora_B=result.lora_B, **module_kw,
            )
            hist = Counter(qt.bits_per_row.tolist())
            layer_reports.append(LayerReport(
                name, tuple(weight.shape), {int(k): int(v) for k, v in sorted(hist.items())},
                qt.nominal_bits, qt.effective_bits, result.sse_quant, result.sse, result.best_iter,
            ))
        new.train(linear.training)
        set_module(model, name, new)
        del linear, weight
    return layer_reports


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
                  s: Settings, hessian: torch.Tensor | None) -> LoftQResult:
    """The quantized base and adapters of one layer: ``loftq_init`` with the quantizer fixed
    (``loftq_iters`` alternations; 0 = standard LoRA init; ``hessian`` = the calibrated init's
    input Gram ``[in, in]``, None for LoftQ)."""
    return loftq_init(weight, quantize_fn, s.rank, s.alpha, iters=s.loftq_iters, name=f"layer {name!r}",
                      hessian=hessian, damp=s.init_damp)


def layer_quantizer(
    method: str,
    bits_per_row: torch.Tensor | None,
    codebooks: dict[int, torch.Tensor] | None,
    bits: float,
    group_size: int,
    double_quant: bool,
    codebook_iters: int,
    weight_power: float,
    backend: str,
    device: torch.device,
    quant_options: dict[str, Any],
    importance: torch.Tensor | None = None,
    relearn: bool = False,
) -> Callable[[torch.Tensor], QuantizedTensor]:
    """The ``[out, in] → QuantizedTensor`` (quantize + pack) used by LoftQ for one layer (bits fixed).

    ``importance``: Fisher diagonal for LowRA without a plan and ``fisher_codebooks``.
    ``relearn`` (LowRA, ``init_codebooks="relearn"``): the first call uses the codebooks learned on
    ``W`` (the planner's, or this layer's at the integer budget without a plan), every later one — the
    init's re-quantizations of ``W − s·BA`` — relearns each row's codebook on its argument at the
    row's width.
    """
    if method == "lowra" and bits_per_row is not None:
        bits_dev = bits_per_row.to(device)
        widths = sorted(torch.unique(bits_per_row).tolist())
        tables = {b: codebooks[b].to(device) for b in widths}
        calls = [0]

        def planned(m: torch.Tensor) -> QuantizedTensor:
            calls[0] += 1
            use = tables
            if relearn and calls[0] > 1:
                from lowra.codebook import learn_codebooks

                learned = learn_codebooks(m, bits=tuple(widths), group_size=group_size, iters=codebook_iters,
                                          weight_power=weight_power, double_quant=double_quant)
                use = {b: learned.codebooks[b].to(device) for b in widths}
            return QuantizedTensor.from_codebooks(m, bits_dev, use, group_size, double_quant, method="lowra",
                                                  backend=backend)

        return planned
    from lowra.quantizers import quantize

    int_bits = _integer_bits(bits, method)
    if method == "lowra":
        # no plan: learn this layer's codebooks once and keep them fixed through LoftQ (relearn: on
        # every re-quantization too)
        from lowra.codebook import learn_codebooks

        state: dict[str, Any] = {}

        def fixed(m: torch.Tensor) -> QuantizedTensor:
            if "tables" not in state or relearn:
                learned = learn_codebooks(m, bits=(int_bits,), group_size=group_size, iters=codebook_iters,
                                          weight_power=weight_power, double_quant=double_quant,
                                          importance=importance, weigh_codebooks=importance is not None)
                state["tables"] = learned.codebooks
            return QuantizedTensor.from_codebooks(m, int_bits, state["tables"], group_size, double_quant,
                                                  method="lowra", backend=backend)

        return fixed
    return lambda m: quantize(m, int_bits, method=method, group_size=group_size, double_quant=double_quant,
                              backend=backend, **quant_options)
