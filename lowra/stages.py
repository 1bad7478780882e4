"""The stages of ``quantize_model``, one function each, in the order it calls them.

1. :func:`resolve_settings` — what the run needs (:class:`Settings`) from a validated
   :class:`~lowra.config.LowRAConfig` and the call's data;
2. :func:`find_targets` — the ``nn.Linear`` layers to quantize, their weights checked;
3. :func:`calibrate` — layer statistics from calibration windows, only when something needs them
   (OPTQ input Hessians; Fisher diagonals, K-FAC factors or input Grams for LowRA's data-driven
   error tables, Fisher-weighted codebooks and the calibrated adapter init);
4. :func:`error_tables` — LowRA with a plan: per layer, learned codebooks and the per-row error
   table ``[out, K]`` (only the small codebooks are kept, never a copy of W);
5. :func:`plan_precision` — one precision plan (``lowra.precision.assign_precision``) over the rows
   of every layer under the average budget;
6. :func:`lowra.quantize_layers.quantize_layers` — one layer at a time: quantize + pack
   (``layer_quantizer``), init the adapters (``init_adapters``: LoftQ or the calibrated init, the
   quantizer fixed), and swap the ``nn.Linear`` for a ``LowRALinear`` (dropped at once: the peak
   stays near one fp32 layer) — in its own module;
7. :func:`finish_report` — the model-level numbers of the :class:`~lowra.report.QuantizationReport`.

Stages 4-5 run for ``method="lowra"`` with a plan only; every other method stores one integer
width for every row through the same stage 6.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lowra.config import LowRAConfig
from lowra.format import QuantizedTensor
from lowra.layers import find_target_linears, mark_only_lora_trainable
from lowra.report import LayerReport, QuantizationReport
from lowra.validation import check_weight

__all__ = [
    "METHOD_NONE",
    "Calibration",
    "ErrorTables",
    "Settings",
    "calibrate",
    "error_tables",
    "find_targets",
    "finish_report",
    "new_report",
    "plan_precision",
    "resolve_settings",
]

#: ``method`` of the plain-LoRA baseline: no quantization, a frozen dense base.
METHOD_NONE = "none"


# ------------------------------------------------------------------------------ 1. settings
@dataclass
class Settings:
    """Every option of one ``quantize_model`` call, resolved from its ``LowRAConfig`` (``config``).

    Resolved: ``candidates`` include an integer budget stored without a plan; ``codebook_iters``
    is 0 for ``codebook="nf"`` (the NormalFloat start); ``loftq_iters`` is 0 at rank 0;
    ``use_plan`` is False for ``plan="uniform"``; ``needs_calibration``: the method's quantizer
    needs input Hessians (OPTQ); ``adapter_dtype`` is a ``torch.dtype``.  ``quant_options`` /
    ``layer_options`` may hold tensors (a layer's ``hessian=``): data of this call, not configuration.
    """

    config: LowRAConfig
    method: str
    bits: float
    rank: int
    alpha: float
    dropout: float
    target_modules: str | list[str] | tuple[str, ...] | None
    skip_modules: tuple[str, ...] | list[str]
    loftq_iters: int
    group_size: int
    double_quant: bool
    candidates: tuple[int, ...]
    budget_scope: str
    use_plan: bool
    codebook_iters: int
    weight_power: float
    plan_options: dict[str, Any]
    adapter_dtype: torch.dtype | None
    backend: str
    progress: bool
    calibration_batch_size: int
    error: str
    fisher_codebooks: bool
    init: str
    init_damp: float
    init_codebooks: str
    low_bits_init: dict[str, Any] | None
    budget_kind: str
    measure_windows: int
    quant_options: dict[str, Any]
    layer_options: dict[str, dict[str, Any]]
    needs_calibration: bool = False

    @property
    def with_plan(self) -> bool:
        """LowRA with a precision plan: stages 4-5 run."""
        return self.method == "lowra" and self.use_plan

    @property
    def calibrated_init(self) -> bool:
        """The calibrated init may run (with ``loftq_iters`` or, on a low-bit plan, ``low_bits_init``'s)."""
        low = self.low_bits_init["loftq_iters"] if self.low_bits_init and self.rank > 0 else 0
        return self.init == "calibrated" and max(self.loftq_iters, low) > 0

    @property
    def table_needs_data(self) -> bool:
        from lowra.error_tables import DATA_TABLES

        return self.with_plan and self.error in DATA_TABLES

    @property
    def fisher_needed(self) -> bool:
        return self.method == "lowra" and (
            (self.table_needs_data and self.error in ("fisher", "measured")) or self.fisher_codebooks)

    @property
    def stats_needed(self) -> bool:
        """Stage 3 collects statistics for LowRA's tables or the calibrated init."""
        return self.method != METHOD_NONE and (self.table_needs_data or self.calibrated_init or self.fisher_needed)


def _integer_bits(bits: float, method: str) -> int:
    if float(bits) != round(float(bits)):
        raise ValueError(
            f"method {method!r} quantizes every row at one integer width, got bits={bits}; a "
            "fractional budget needs method='lowra' (per-row precision plan)"
        )
    return int(round(float(bits)))


def resolve_settings(config: LowRAConfig, *, backend: str = "auto", progress: bool = True,
                     layer_options: dict[str, dict[str, Any]] | None = None,
                     quant_options: dict[str, Any] | None = None) -> Settings:
    """Stage 1: what this call runs, from a (validated) ``LowRAConfig`` and the call's runtime arguments.

    ``quant_options``: the call's non-JSON quantizer options (tensors), merged over
    ``config.quant_options``; ``layer_options`` are copied (stage 3 adds OPTQ Hessians to them).
    """
    c = config
    use_plan = c.plan == "ilp"
    codebook_iters = 0 if c.method == "lowra" and c.codebook == "nf" else c.codebook_iters
    candidates = tuple(c.candidates)
    if c.method != METHOD_NONE and c.budget_kind == "nominal" and (c.method != "lowra" or not use_plan):
        int_bits = _integer_bits(c.bits, c.method)
        if c.method == "lowra" and int_bits not in candidates:
            candidates = tuple(sorted({*candidates, int_bits}))
    needs_calibration = False
    if c.method not in ("lowra", METHOD_NONE):
        from lowra.quantizers import get_quantizer

        needs_calibration = bool(getattr(get_quantizer(c.method), "needs_calibration", False))
    return Settings(
        config=c, method=c.method, bits=c.bits, rank=c.rank, alpha=c.alpha, dropout=c.dropout,
        target_modules=c.target_modules, skip_modules=c.skip_modules,
        loftq_iters=0 if c.rank == 0 else c.loftq_iters, group_size=c.group_size, double_quant=c.double_quant,
        candidates=candidates, budget_scope=c.budget_scope, use_plan=use_plan, codebook_iters=codebook_iters,
        weight_power=c.weight_power, plan_options=dict(c.plan_options),
        adapter_dtype=None if c.adapter_dtype is None else getattr(torch, c.adapter_dtype),
        backend=backend, progress=progress, calibration_batch_size=c.calibration_batch_size, error=c.error,
        fisher_codebooks=c.fisher_codebooks, init=c.init, init_damp=c.init_damp,
        init_codebooks=c.init_codebooks, low_bits_init=None if c.low_bits_init is None else dict(c.low_bits_init),
        budget_kind=c.budget_kind,
        measure_windows=c.measure_windows, quant_options={**c.quant_options, **(quant_options or {})},
        layer_options={k: dict(v) for k, v in (layer_options or {}).items()}, needs_calibration=needs_calibration,
    )


# ------------------------------------------------------------------------------- 2. targets
def find_targets(model: nn.Module, s: Settings) -> list[tuple[str, nn.Linear]]:
    """Stage 2: the target linears (``find_target_linears``), each weight finite and wide enough for the rank."""
    targets = find_target_linears(model, s.target_modules, s.skip_modules)
    for name, linear in targets:
        check_weight(linear.weight, f"layer {name!r} weight")
        if linear.bias is not None:
            check_weight(linear.bias[None], f"layer {name!r} bias")
        if s.rank > min(linear.in_features, linear.out_features):
            raise ValueError(f"layer {name!r} {tuple(linear.weight.shape)} is too small for rank {s.rank}")
    return targets


# --------------------------------------------------------------------------- 3. calibration
@dataclass
class Calibration:
    """Stage 3's output, by layer name: Fisher diagonals ``[out, in]``, input Hessians / Grams
    ``[in, in]``, K-FAC output-gradient factors ``[out, out]`` (each empty when not needed), and
    the seconds spent (``ran``: a calibration pass happened, reported as ``calibration_s``).
    OPTQ's Hessians go into ``Settings.layer_options[name]["hessian"]`` instead."""

    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    output_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    ran: bool = False


def calibrate(model: nn.Module, targets: list[tuple[str, nn.Linear]], s: Settings,
              calibration: torch.Tensor | None) -> Calibration:
    """Stage 3: run the calibration windows through the still full-precision model, if anything needs them."""
    out = Calibration()
    if s.needs_calibration:
        t0 = time.perf_counter()
        _add_calibration_hessians(model, targets, s.method, calibration, s.calibration_batch_size,
                                  s.layer_options, s.quant_options)
        out.seconds = time.perf_counter() - t0
        out.ran = True
    if s.stats_needed:
        from lowra.error_tables import calibration_statistics

        t0 = time.perf_counter()
        stats = calibration_statistics(
            model, [n for n, _ in targets], calibration, s.calibration_batch_size,
            fisher=s.fisher_needed,
            hessians=s.calibrated_init or (s.table_needs_data and s.error == "kfac"),
            output_grads=s.table_needs_data and s.error == "kfac",
            wanted=f"quant.error={s.error}" if s.table_needs_data or s.fisher_needed else "quant.init=calibrated",
            progress=s.progress,
        )
        out.fisher, out.hessians, out.output_grads = stats.fisher, stats.hessians, stats.output_grads
        out.seconds += time.perf_counter() - t0
        out.ran = True
    elif calibration is not None and s.method != METHOD_NONE and not s.needs_calibration:
        warnings.warn(f"method {s.method!r} does not use calibration data; `calibration=` is ignored",
                      RuntimeWarning, stacklevel=3)
    return out


def _add_calibration_hessians(
    model: nn.Module,
    targets: list[tuple[str, nn.Linear]],
    method: str,
    calibration: torch.Tensor | None,
    batch_size: int,
    layer_options: dict[str, dict[str, Any]],
    quant_options: dict[str, Any],
) -> None:
    """Put each target's input Hessian into ``layer_options[name]["hessian"]`` (in place).

    Runs ``collect_hessians`` on the still full-precision model (no layer swapped yet). Layers
    that already have ``hessian``/``inputs`` (per layer or in ``quant_options``) keep them.
    """
    def has_data(opts: dict[str, Any]) -> bool:
        return opts.get("hessian") is not None or opts.get("inputs") is not None

    if has_data(quant_options):
        return
    missing = [n for n, _ in targets if not has_data(layer_options.get(n, {}))]
    if not missing:
        return
    from lowra.calibration import calibration_batches, collect_hessians

    batches = calibration_batches(calibration, batch_size, f"method {method!r}")
    hessians = collect_hessians(model, batches, missing)
    for name in missing:
        layer_options.setdefault(name, {})["hessian"] = hessians.pop(name)


def new_report(s: Settings, targets: list[tuple[str, nn.Linear]], calib: Calibration) -> QuantizationReport:
    """The report the stages fill: the settings, and ``times`` with one entry per stage."""
    report = QuantizationReport(
        method=s.method,
        bits_target=None if s.method == METHOD_NONE else float(s.bits),
        bits_nominal=0.0,
        bits_effective=0.0,
        rank=int(s.rank),
        alpha=float(s.alpha),
        loftq_iters=int(s.loftq_iters),
        group_size=int(s.group_size),
        double_quant=bool(s.double_quant),
        candidates=tuple(s.candidates),
        num_params=sum(m.weight.numel() for _, m in targets),
    )
    report.config = s.config.to_dict()
    report.error_table = s.error if s.with_plan else None
    report.init = s.init if s.loftq_iters > 0 else "lora"
    report.budget_kind = s.budget_kind
    report.times = {"codebooks_s": 0.0, "plan_s": 0.0, "quantize_s": 0.0, "loftq_s": 0.0}
    if calib.ran:
        report.times["calibration_s"] = calib.seconds
    return report


def _progress(iterable: Iterable, desc: str, enabled: bool, total: int | None = None) -> Iterable:
    """Per-layer progress of a stage (``lowra.progress``: a bar on a terminal, log lines otherwise)."""
    from lowra.progress import progress

    return progress(iterable, desc, enabled, total=total, unit="layer")


# -------------------------------------------------------------------------- 4. error tables
@dataclass
class ErrorTables:
    """Stage 4's output, in target order: the error table ``[out, K]`` of every layer, its rows'
    parameters ``[out]`` and stored bits ``[out, K]`` (``lowra.format.row_storage_bits``), and
    the learned codebooks ``{name: {bits: [out, 2**bits]}}`` the layers are then stored with."""

    errors: list[torch.Tensor]
    params: list[torch.Tensor]
    costs: list[torch.Tensor]
    codebooks: dict[str, dict[int, torch.Tensor]]


def error_tables(model: nn.Module, targets: list[tuple[str, nn.Linear]], s: Settings, calib: Calibration,
                 calibration: torch.Tensor | None, report: QuantizationReport) -> ErrorTables:
    """Stage 4: per layer, ``learn_codebooks(W, bits=candidates)`` and its row error table
    (``quant.error``: weight SSE, Fisher, relative, K-FAC; ``measured`` scales Fisher shares by
    each layer's measured loss increase).  Times go to ``report.times``."""
    from lowra.codebook import learn_codebooks
    from lowra.error_tables import kfac_row_errors, row_error_table
    from lowra.format import row_storage_bits

    t0 = time.perf_counter()
    errors, params, costs = [], [], []
    codebooks: dict[str, dict[int, torch.Tensor]] = {}
    candidates, group_size, double_quant = s.candidates, s.group_size, s.double_quant
    for name, linear in _progress(targets, "codebooks", s.progress):
        importance = calib.fisher.pop(name, None)
        result = learn_codebooks(
            linear.weight.detach(), bits=candidates, group_size=group_size, iters=s.codebook_iters,
            weight_power=s.weight_power, double_quant=double_quant, importance=importance,
            weigh_codebooks=s.fisher_codebooks,
        )
        codebooks[name] = {b: c.cpu() for b, c in result.codebooks.items()}
        if s.error == "kfac":
            h = calib.hessians[name] if s.calibrated_init else calib.hessians.pop(name)
            errors.append(kfac_row_errors(linear.weight.detach(), result.codebooks, candidates, group_size,
                                          double_quant, calib.output_grads.pop(name), h))
        elif s.error == "measured":
            errors.append(result.error.cpu())  # Fisher row errors: the shares, scaled below
        else:
            errors.append(row_error_table(s.error, result.error, linear.weight.detach()).cpu())
        params.append(torch.full((linear.out_features,), linear.in_features, dtype=torch.int64))
        row_cost = [row_storage_bits(linear.in_features, b, group_size, double_quant) for b in candidates]
        costs.append(torch.tensor(row_cost, dtype=torch.int64).expand(linear.out_features, -1))
    report.times["codebooks_s"] = time.perf_counter() - t0
    if s.error == "measured":
        from lowra.error_tables import measure_layer_losses, measured_row_table

        t0 = time.perf_counter()

        def dequantized(name: str, linear: nn.Module, b: int) -> torch.Tensor:
            w = linear.weight.detach()
            tables = {b: codebooks[name][b].to(w.device)}
            return QuantizedTensor.from_codebooks(w, b, tables, group_size, double_quant,
                                                  backend=s.backend).dequantize(torch.float32)

        n_win = max(1, min(int(s.measure_windows), int(torch.as_tensor(calibration).shape[0])))
        base_loss, increase = measure_layer_losses(model, targets, dequantized, candidates,
                                                   torch.as_tensor(calibration)[:n_win], s.calibration_batch_size)
        errors = [measured_row_table(increase[i], e, candidates) for i, e in enumerate(errors)]
        report.times["measure_s"] = time.perf_counter() - t0
        report.layer_loss_increase = {name: [float(v) for v in increase[i]] for i, (name, _) in enumerate(targets)}
    return ErrorTables(errors, params, costs, codebooks)


# -------------------------------------------------------------------------------- 5. plan
def plan_precision(targets: list[tuple[str, nn.Linear]], tables: ErrorTables, s: Settings,
                   report: QuantizationReport) -> dict[str, torch.Tensor]:
    """Stage 5: one ``assign_precision`` over the rows of all layers; int64 bits ``[out]`` per layer.

    The solve info goes to ``report.plan``; the error tables are released afterwards.  With
    ``budget_kind="effective"`` every row costs its stored bits (``tables.costs``), so the budget
    counts every stored bit.
    """
    t0 = time.perf_counter()
    if s.progress:
        from lowra.progress import log as progress_log

        progress_log.info("plan: %d rows of %d layers at %g bits (%s budget)", sum(e.shape[0] for e in tables.errors),
                          len(tables.errors), s.bits, s.budget_kind)
    try:
        per_layer, report.plan = _solve_plan(tables.errors, tables.params, s.bits, s.candidates, s.budget_scope,
                                             dict(s.plan_options),
                                             tables.costs if s.budget_kind == "effective" else None)
    except ValueError as exc:
        if s.budget_kind != "effective":
            raise
        raise ValueError(f"quant.budget_kind=effective, bits={s.bits}: {exc}") from exc
    layer_bits = {name: b for (name, _), b in zip(targets, per_layer)}
    tables.errors, tables.params = [], []
    report.times["plan_s"] = time.perf_counter() - t0
    if s.progress:
        progress_log.info("plan: %.1f s, %.3f bits, gap to the LP bound %.2e (%s)", report.times["plan_s"],
                          report.plan.get("average_bits", float("nan")), report.plan.get("gap", float("nan")),
                          report.plan.get("info", {}).get("plan_source", "?"))
    return layer_bits


def _solve_plan(
    errors: list[torch.Tensor],
    params: list[torch.Tensor],
    budget: float,
    candidates: tuple[int, ...],
    scope: str,
    plan_options: dict[str, Any],
    bit_costs: list[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """One ``assign_precision`` over the rows of all layers; int64 bits per layer + solve info.

    ``bit_costs`` (``budget_kind="effective"``): per layer ``[out, K]`` stored bits of each row at
    each candidate (``lowra.format.row_storage_bits``), so the budget counts every stored bit.
    """
    from lowra.precision import assign_precision

    sizes = [e.shape[0] for e in errors]
    extra = {} if bit_costs is None else {"bit_costs": torch.cat(bit_costs).numpy()}
    plan = assign_precision(
        torch.cat(errors).numpy(), torch.cat(params).numpy(), budget, candidates=candidates,
        scope=scope, layer_sizes=sizes, **extra, **plan_options,
    )
    info = plan.summary()
    # every pure width that fits the budget is a feasible plan: a correct planner never does worse
    all_errors = torch.cat(errors)
    info["sse_uniform"] = {int(b): float(all_errors[:, j].sum()) for j, b in enumerate(candidates)}
    feasible = [info["sse_uniform"][b] for b in candidates if b <= budget + 1e-9] if bit_costs is None else []
    if feasible and info["objective"] > min(feasible) * (1 + 1e-6):
        warnings.warn(
            f"precision plan at {budget} bits has SSE {info['objective']:.4g}, worse than storing every "
            f"row at one width that fits the budget ({min(feasible):.4g}); check lowra.precision",
            RuntimeWarning, stacklevel=4,
        )
    return [torch.from_numpy(b.astype("int64")) for b in plan.split(sizes)], info


def _code_bit_budget(s: Settings, layer_bits: dict[str, torch.Tensor], in_features: dict[str, int]) -> float:
    """The code-bit budget ``low_bits_init`` compares: ``bits`` for a nominal budget (the plan may
    fall a hair below it) or without a plan; for ``budget_kind="effective"`` the plan's mean code
    width, weighted by parameters (``layer_bits``: bits ``[out]`` per layer, ``in_features`` by layer)."""
    if not layer_bits or s.budget_kind == "nominal":
        return float(s.bits)
    total = sum(int(b.sum()) * in_features[n] for n, b in layer_bits.items())
    return total / sum(b.numel() * in_features[n] for n, b in layer_bits.items())


def init_for_plan(s: Settings, layer_bits: dict[str, torch.Tensor], in_features: dict[str, int],
                  report: QuantizationReport) -> Settings:
    """The settings the init runs with, once the plan (``layer_bits``, empty without one) is known:
    ``low_bits_init``'s alternations and codebooks when the code-bit budget is below its ``below``
    (LowRA, rank > 0), else ``s``.

    ``report.loftq_iters`` / ``init_codebooks`` say what ran and ``report.low_bits_init`` whether
    the rule applied.
    """
    low = s.low_bits_init
    applies = (bool(low) and s.method == "lowra" and s.rank > 0
               and _code_bit_budget(s, layer_bits, in_features) < low["below"])
    if applies:
        learned = s.config.codebook == "learned"  # NormalFloat tables (codebook="nf") are never relearned
        s = replace(s, loftq_iters=int(low["loftq_iters"]),
                    init_codebooks=str(low["init_codebooks"]) if learned else "fixed")
    report.low_bits_init = applies
    report.loftq_iters = int(s.loftq_iters)
    report.init_codebooks = s.init_codebooks
    report.init = s.init if s.loftq_iters > 0 else "lora"
    return s


# ------------------------------------------------------------------------------ 7. report
def finish_report(model: nn.Module, s: Settings, report: QuantizationReport, layer_reports: list[LayerReport],
                  t_start: float) -> QuantizationReport:
    """Stage 7: freeze all but the adapters; parameter-weighted bits and total SSE; the report and
    the config are kept on the model (``model.lowra_report``, ``model.lowra_config``)."""
    mark_only_lora_trainable(model)
    report.layers = layer_reports
    total = report.num_params
    shapes = [lr.shape[0] * lr.shape[1] for lr in layer_reports]
    report.bits_nominal = sum(lr.nominal_bits * n for lr, n in zip(layer_reports, shapes)) / total
    report.bits_effective = sum(lr.effective_bits * n for lr, n in zip(layer_reports, shapes)) / total
    report.total_sse_quant = sum(lr.sse_quant for lr in layer_reports)
    report.total_sse = sum(lr.sse_loftq for lr in layer_reports)
    report.times["total_s"] = time.perf_counter() - t_start
    model.lowra_report = report
    model.lowra_config = s.config
    return report
