"""``quantize_model``: quantize any HF model's linears in place (the model in memory) and init the adapters.

``quantize_model(model, LowRAConfig(bits=2.0, method="lowra", ...))`` (or the shortcut
``quantize_model(model, 2.0, method="lowra", ...)``) replaces every target ``nn.Linear`` by a
``LowRALinear`` (frozen quantized base + LoRA adapters) and returns a ``QuantizationReport``.
Every option is a field of :class:`~lowra.config.LowRAConfig`.

For ``method="lowra"`` it runs the LowRA pipeline (docs/design.md, "The pipeline") over the whole model:

1. per target layer: ``learn_codebooks(W, bits=candidates)`` → per-row error table ``[out, K]``
   (only the small codebooks are kept, never a copy of W);
2. one model-wide precision plan: ``assign_precision`` over the concatenated rows of every layer
   (``params`` = in-features per row) under the average budget ``bits`` (``budget_scope="matrix"``
   solves one plan per layer instead);
3. per layer: ``QuantizedTensor.from_codebooks(W, bits_per_row, codebooks)``, then LoftQ with the
   same per-row widths and FIXED codebooks, then the swap ``nn.Linear`` → ``LowRALinear``.

Decision: with ``method="lowra"`` the planner also runs at an integer budget (it may then mix, say,
1- and 4-bit rows at an average of 2 — LowRA's point); ``plan="uniform"`` at an integer budget
stores every row at that width with its learned codebook instead.

Other methods go through the same path with one integer width for all rows: ``"nf"`` (NormalFloat,
QLoRA/LoftQ), ``"uniform"`` (round-to-nearest), any registered quantizer (``quant_options`` are
passed to it), and ``"none"``: no quantization, a frozen dense base and the standard LoRA init —
the plain-LoRA baseline through the very same module.

Memory: phase 1 keeps codebooks and error tables only; phase 3 works one layer at a time and drops
the ``nn.Linear`` as soon as its replacement exists, so the peak stays near the (partly) quantized
model plus one layer in fp32 (plus its SVD workspace).

Layout: ``quantize_model`` only chains the named stages of :mod:`lowra.pipeline` (find targets →
calibrate if needed → codebooks / error tables → plan → quantize + pack → init adapters → report);
target selection and adapter helpers live in :mod:`lowra.model_layers`, the reports in
:mod:`lowra.report`; :mod:`lowra.streaming` runs the same stages shard by shard (``quantize_pretrained``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowra import pipeline
from lowra.config import LowRAConfig, config_from_arguments
from lowra.layer_quantization import quantize_layers
from lowra.progress import activity
from lowra.report import QuantizationReport

__all__ = ["quantize_model"]


def quantize_model(
    model: nn.Module,
    config: LowRAConfig | Mapping[str, Any] | float | None = None,
    *,
    calibration: torch.Tensor | None = None,
    layer_options: dict[str, dict[str, Any]] | None = None,
    backend: str = "auto",
    progress: bool = True,
    **options: Any,
) -> QuantizationReport:
    """Quantize the target linears of ``model`` in place and attach LoRA adapters.

    ``quantize_model(model, LowRAConfig(bits=2.0, rank=8))``, or the shortcut
    ``quantize_model(model, 2.0, rank=8)`` that builds the same config
    (:func:`lowra.config.config_from_arguments`).

    Args:
        model: any HF (or plain PyTorch) model with ``nn.Linear`` layers, on any device.
        config: a :class:`~lowra.config.LowRAConfig` (every quantization and adapter option), its
            ``to_dict()`` form, or the budget ``bits``.
        calibration: int64 token windows ``[samples, seq_len]`` for whatever needs data: the input
            Hessians of quantizers with ``needs_calibration`` (``"optq"``: each layer gets its own
            ``hessian=``), LowRA's data-driven error tables (``error="fisher"|"kfac"|"measured"``),
            Fisher-weighted codebooks and ``init="calibrated"``.  They run through the still
            full-precision model in batches of ``config.calibration_batch_size`` before any layer
            is swapped.
        layer_options: ``{layer name: {option: value}}`` merged over the quantizer options for that
            layer (other methods than ``"lowra"``; e.g. a precomputed ``hessian``).
        backend: kernels (``"auto"``: Triton on CUDA, the PyTorch reference on CPU).
        progress: per-layer progress bars.
        options: fields of ``LowRAConfig`` (over ``config`` when one is given); ``use_plan=False``
            is ``plan="uniform"``; other keywords are options of the method's quantizer (e.g.
            ``damp`` for OPTQ; tensors among them are used, not stored in the config).
    Returns:
        A ``QuantizationReport`` (``report.config`` = ``config.to_dict()``; also stored as
        ``model.lowra_report``, the config as ``model.lowra_config``). All parameters but the
        adapters are frozen.
    Raises:
        ValueError: a bad option (naming it: see ``LowRAConfig``), an unknown target, NaN/Inf
            weights (naming the layer), data-driven options without ``calibration=``.
    """
    t_start = time.perf_counter()
    config, runtime_options = config_from_arguments(config, options)
    settings = pipeline.resolve_settings(config, backend=backend, progress=progress, layer_options=layer_options,
                                quant_options=runtime_options)
    with activity("quantize", settings.progress):
        targets = pipeline.find_targets(model, settings)
        if calibration is None and settings.needs.any:
            calibration = pipeline.default_calibration(model, settings)
        calib = pipeline.calibrate(model, targets, settings, calibration)
        try:
            report = pipeline.new_report(settings, targets, calib)
            layer_bits: dict[str, torch.Tensor] = {}
            codebooks: dict[str, dict[int, torch.Tensor]] = {}
            if settings.with_plan:
                tables = pipeline.error_tables(model, targets, settings, calib, calibration, report)
                layer_bits = pipeline.plan_precision(targets, tables, settings, report)
                codebooks = tables.codebooks
            settings = pipeline.init_for_plan(settings, layer_bits, {n: m.in_features for n, m in targets}, report)
            layers = quantize_layers(model, targets, settings, layer_bits, codebooks, calib, report)
        finally:
            calib.close()
        return pipeline.finish_report(model, settings, report, layers, t_start)
