"""Model-level API: quantize any HF model's linears in place, LoftQ-init the adapters, train helpers.

``quantize_model(model, bits, method="lowra", ...)`` replaces every target ``nn.Linear`` by a
``LowRALinear`` (frozen quantized base + LoRA adapters) and returns a ``QuantizationReport``.

For ``method="lowra"`` it runs the LowRA pipeline (DESIGN.md §1–2) over the whole model:

1. per target layer: ``learn_codebooks(W, bits=candidates)`` → per-row error table ``[out, K]``
   (only the small codebooks are kept, never a copy of W);
2. one model-wide precision plan: ``assign_precision`` over the concatenated rows of every layer
   (``params`` = in-features per row) under the average budget ``bits`` (``budget_scope="matrix"``
   solves one plan per layer instead);
3. per layer: ``QuantizedTensor.from_codebooks(W, bits_per_row, codebooks)``, then LoftQ with the
   same per-row widths and FIXED codebooks, then the swap ``nn.Linear`` → ``LowRALinear``.

Decision: with ``method="lowra"`` the planner also runs at an integer budget (it may then mix, say,
1- and 4-bit rows at an average of 2 — LowRA's point); ``use_plan=False`` at an integer budget
stores every row at that width with its learned codebook instead.

Other methods go through the same path with one integer width for all rows: ``"nf"`` (NormalFloat,
QLoRA/LoftQ), ``"uniform"`` (round-to-nearest), any registered quantizer (``**quant_options`` are
passed to it), and ``"none"``: no quantization, a frozen dense base and the standard LoRA init —
the plain-LoRA baseline through the very same module.

Memory: phase 1 keeps codebooks and error tables only; phase 3 works one layer at a time and drops
the ``nn.Linear`` as soon as its replacement exists, so the peak stays near the (partly) quantized
model plus one layer in fp32 (plus its SVD workspace).

Layout: ``quantize_model`` only chains the named stages of :mod:`lowra.stages` (find targets →
calibrate if needed → codebooks / error tables → plan → quantize + pack → init adapters → report);
target selection and adapter helpers live in :mod:`lowra.layers`, the reports in
:mod:`lowra.report` (all re-exported here).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from lowra import stages
from lowra.layers import (
    DEFAULT_SKIP_MODULES,
    DEFAULT_TARGET_MODULES,
    find_target_linears,
    lora_parameters,
    lowra_layers,
    mark_only_lora_trainable,
)
from lowra.report import LayerReport, QuantizationReport
from lowra.stages import METHOD_NONE

__all__ = [
    "DEFAULT_SKIP_MODULES",
    "DEFAULT_TARGET_MODULES",
    "METHOD_NONE",
    "LayerReport",
    "QuantizationReport",
    "find_target_linears",
    "lora_parameters",
    "lowra_layers",
    "mark_only_lora_trainable",
    "quantize_model",
]


def quantize_model(
    model: nn.Module,
    bits: float,
    method: str = "lowra",
    rank: int = 16,
    alpha: float = 16.0,
    target_modules: str | list[str] | tuple[str, ...] | None = None,
    loftq_iters: int = 1,
    group_size: int = 64,
    *,
    dropout: float = 0.0,
    double_quant: bool = False,
    candidates: tuple[int, ...] = (1, 2, 4),
    budget_scope: str = "model",
    use_plan: bool = True,
    skip_modules: tuple[str, ...] | list[str] = DEFAULT_SKIP_MODULES,
    codebook_iters: int = 20,
    weight_power: float = 2.0,
    plan_options: dict[str, Any] | None = None,
    adapter_dtype: torch.dtype | None = None,
    backend: str = "auto",
    progress: bool = True,
    codebook: str = "learned",
    plan: str = "ilp",
    calibration: torch.Tensor | None = None,
    calibration_batch_size: int = 16,
    layer_options: dict[str, dict[str, Any]] | None = None,
    error: str = "sse",
    fisher_codebooks: bool = False,
    init: str = "loftq",
    init_damp: float = 0.01,
    budget_kind: str = "nominal",
    measure_windows: int = 16,
    **quant_options: Any,
) -> QuantizationReport:
    """Quantize the target linears of ``model`` in place and attach LoRA adapters.

    Args:
        model: any HF (or plain PyTorch) model with ``nn.Linear`` layers, on any device.
        bits: average code-bit budget in [1, 4] (fractional only with ``method="lowra"``);
            ignored for ``method="none"``.
        method: ``"lowra"``, ``"nf"``, ``"uniform"``, another registered quantizer, or ``"none"``.
        rank, alpha, dropout: LoRA hyper-parameters (scale ``alpha / rank``).
        target_modules: see ``find_target_linears``; embeddings and ``lm_head`` stay dense unless
            targeted explicitly (``skip_modules``).
        loftq_iters: LoftQ alternations T; 0 = standard LoRA init (A Kaiming-uniform, B = 0).
        group_size, double_quant: absmax grouping and its storage (fp16 or double-quantized).
        candidates, budget_scope ("model"/"matrix"), use_plan, codebook_iters, weight_power,
            plan_options: LowRA settings (``plan_options`` go to ``assign_precision``).
        adapter_dtype: dtype of A/B (None: fp32 on CPU, bf16 on GPU).
        codebook: LowRA ablation: ``"learned"`` (per-row Lloyd-Max codebooks) or ``"nf"`` (the
            NormalFloat start of ``learn_codebooks(iters=0)``, symmetric ±m at 1 bit) for both the
            planner's error tables and the stored tables; the plan stays on.
        plan: LowRA ablation: ``"ilp"`` (precision plan) or ``"uniform"`` (= ``use_plan=False``:
            every row at the integer budget; a fractional budget is then a ValueError).
        calibration: int64 token windows ``[samples, seq_len]`` for quantizers that need input
            Hessians (``needs_calibration``, e.g. ``"optq"``): they are run through the still
            full-precision model in batches of ``calibration_batch_size``
            (``lowra.calibration.collect_hessians``) before any layer is swapped, and each layer
            gets its own ``hessian=``.
        layer_options: ``{layer name: {option: value}}`` merged over ``quant_options`` for that
            layer's quantizer (other methods than ``"lowra"``).
        error: the planner's error table (``method="lowra"``; ``lowra.error_tables``):
            ``"sse"`` (the paper's data-free weight SSE), ``"fisher"`` (diagonal empirical Fisher
            ``Σⱼ Fᵢⱼ ΔWᵢⱼ²`` from ``calibration``), ``"relative"`` (data-free: each layer's SSE
            divided by its mean squared weight, so layers of small norm are not starved),
            ``"kfac"`` (``Gᵢ ΔWᵢ H ΔWᵢᵀ``, Kronecker-factored Fisher from ``calibration``),
            ``"measured"`` (each layer's loss increase measured on the first ``measure_windows``
            calibration windows with that layer alone quantized, split among its rows by their
            Fisher row errors).
        fisher_codebooks: with ``error="fisher"``, fit the Lloyd-Max codebooks to the
            Fisher-weighted error as well (else the codebooks stay data-free).
        init: ``"loftq"`` (rank-r SVD of the residual, the paper) or ``"calibrated"`` (the same in
            the activation norm ``‖(W − deq(Q) − s·BA)X‖``, ``H = XᵀX`` from ``calibration``;
            ``lowra.loftq.ActivationWhitening``); ``loftq_iters`` alternations either way.
        init_damp: relative damping of ``H`` for ``init="calibrated"``.
        budget_kind: ``"nominal"``: ``bits`` counts code bits (QLoRA/LoftQ convention);
            ``"effective"`` (``method="lowra"`` with a plan): ``bits`` counts every stored bit —
            each row's cost in the plan includes its codes, codebook, scales and row index
            (``lowra.format.row_storage_bits``); budgets up to 16 are accepted, and one the
            cheapest plan cannot meet is a ValueError.
        quant_options: extra options for the quantizer of other methods (e.g. ``damp`` for OPTQ).
    Returns:
        A ``QuantizationReport`` (also stored as ``model.lowra_report``). All parameters but the
        adapters are frozen.
    Raises:
        ValueError: bits outside [1, 4], an unknown target, NaN/Inf weights (naming the layer),
            a quantizer that needs calibration without ``calibration=``, a fractional budget with
            ``plan="uniform"``.
    """
    t_start = time.perf_counter()
    s = stages.resolve_settings(
        bits, method, rank, alpha, target_modules, loftq_iters, group_size, dropout=dropout,
        double_quant=double_quant, candidates=candidates, budget_scope=budget_scope, use_plan=use_plan,
        skip_modules=skip_modules, codebook_iters=codebook_iters, weight_power=weight_power,
        plan_options=plan_options, adapter_dtype=adapter_dtype, backend=backend, progress=progress,
        codebook=codebook, plan=plan, calibration_batch_size=calibration_batch_size, layer_options=layer_options,
        error=error, fisher_codebooks=fisher_codebooks, init=init, init_damp=init_damp, budget_kind=budget_kind,
        measure_windows=measure_windows, quant_options=quant_options,
    )
    targets = stages.find_targets(model, s)
    calib = stages.calibrate(model, targets, s, calibration)
    report = stages.new_report(s, targets, calib)
    layer_bits: dict[str, torch.Tensor] = {}
    codebooks: dict[str, dict[int, torch.Tensor]] = {}
    if s.with_plan:
        tables = stages.error_tables(model, targets, s, calib, calibration, report)
        layer_bits = stages.plan_precision(targets, tables, s, report)
        codebooks = tables.codebooks
    layers = stages.quantize_layers(model, targets, s, layer_bits, codebooks, calib, report)
    return stages.finish_report(model, report, layers, t_start)
