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
6. :func:`lowra.layer_quantization.quantize_layers` — one layer at a time: quantize + pack
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
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowra.config import LowRAConfig
from lowra.format import QuantizedTensor
from lowra.methods import CalibrationNeeds, Method
from lowra.model_layers import find_target_linears, mark_only_lora_trainable
from lowra.progress import activity
from lowra.report import LayerReport, QuantizationReport
from lowra.validation import check_weight
from lowra.weights import ModelSource, WeightSource

if TYPE_CHECKING:  # pragma: no cover
    from lowra.blockwise import BlockLayout, StatStore

__all__ = [
    "Calibration",
    "LayerStats",
    "calibration_from_store",
    "default_calibration",
    "ErrorTables",
    "Settings",
    "calibrate",
    "error_tables",
    "find_targets",
    "finish_report",
    "new_report",
    "plan_precision",
    "resolve_settings",
    "solve_plan",
]

# ------------------------------------------------------------------------------ 1. settings
@dataclass
class Settings:
    """One ``quantize_model`` call: its ``LowRAConfig`` (read, never copied: ``settings.bits`` is
    ``settings.config.bits``), its :class:`~lowra.methods.Method`, the call's runtime arguments and the
    few values resolved from them.

    Resolved: ``candidates`` (an integer budget stored without a plan joins them);
    ``codebook_iters`` (0 for ``codebook="nf"``: the NormalFloat start); ``loftq_iters`` (0 at
    rank 0; ``init_for_plan`` may raise it for a low-bit plan) and ``init_codebooks``;
    ``adapter_dtype`` as a ``torch.dtype``; ``needs``: the calibration statistics the method asks
    for.  ``quant_options`` / ``layer_options`` may hold tensors (a layer's ``hessian=``): data of
    this call, not configuration.
    """

    config: LowRAConfig
    method_object: Method
    backend: str
    progress: bool
    candidates: tuple[int, ...]
    codebook_iters: int
    loftq_iters: int
    init_codebooks: str
    adapter_dtype: torch.dtype | None
    needs: CalibrationNeeds
    quant_options: dict[str, Any] = field(default_factory=dict)
    layer_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        """Every other setting is the config's field of that name."""
        if name.startswith("__") or name == "config":
            raise AttributeError(name)
        return getattr(self.config, name)

    @property
    def use_plan(self) -> bool:
        return self.config.plan == "ilp"

    @property
    def with_plan(self) -> bool:
        """The method plans precision: stages 4-5 run."""
        return self.method_object.plans(self.config)

    @property
    def calibrated_init(self) -> bool:
        """The calibrated init may run (its input Grams are kept until the layer is quantized)."""
        return self.needs.init

    @property
    def needs_calibration(self) -> bool:
        """The method's quantizer takes per-layer input Hessians (OPTQ)."""
        return self.needs.layer_hessians

    @property
    def stats_needed(self) -> bool:
        """Stage 3 collects statistics for LowRA's tables or the calibrated init."""
        n = self.needs
        return n.fisher or n.hessians or n.output_grads


def resolve_settings(config: LowRAConfig, *, backend: str = "auto", progress: bool = True,
                     layer_options: dict[str, dict[str, Any]] | None = None,
                     quant_options: dict[str, Any] | None = None) -> Settings:
    """Stage 1: what this call runs, from a (validated) ``LowRAConfig`` and the call's runtime arguments.

    ``quant_options``: the call's non-JSON quantizer options (tensors), merged over
    ``config.quant_options``; ``layer_options`` are copied (stage 3 adds OPTQ Hessians to them).
    """
    c, method = config, config.method_object
    return Settings(
        config=c, method_object=method, backend=backend, progress=progress, candidates=method.candidates(c),
        codebook_iters=0 if c.codebook == "nf" else c.codebook_iters,
        loftq_iters=0 if c.rank == 0 else c.loftq_iters, init_codebooks=c.init_codebooks,
        adapter_dtype=None if c.adapter_dtype is None else getattr(torch, c.adapter_dtype), needs=method.needs(c),
        quant_options={**c.quant_options, **(quant_options or {})},
        layer_options={k: dict(v) for k, v in (layer_options or {}).items()},
    )


# ------------------------------------------------------------------------------- 2. targets
def find_targets(model: nn.Module, settings: Settings) -> list[tuple[str, nn.Linear]]:
    """Stage 2: the target linears (``find_target_linears``), each weight finite and wide enough for the rank."""
    targets = find_target_linears(model, settings.target_modules, settings.skip_modules)
    for name, linear in targets:
        check_weight(linear.weight, f"layer {name!r} weight")
        if linear.bias is not None:
            check_weight(linear.bias[None], f"layer {name!r} bias")
        if settings.rank > min(linear.in_features, linear.out_features):
            raise ValueError(f"layer {name!r} {tuple(linear.weight.shape)} is too small for rank {settings.rank}")
    return targets


# --------------------------------------------------------------------------- 3. calibration
class LayerStats:
    """One kind of calibration statistic by layer name (``"hessian"``, ``"output_grad"``, ``"fisher"``),
    read from the block files of a :class:`~lowra.blockwise.StatStore` (one block's file loaded at
    a time), or held in ``values`` (the whole-model pass of a model without decoder blocks)."""

    def __init__(self, kind: str, store: StatStore | None = None, block_of: dict[str, int] | None = None,
                 values: dict[str, torch.Tensor] | None = None) -> None:
        self.kind, self.store, self.block_of = kind, store, block_of or {}
        self.values = values if values is not None or store is not None else {}

    def get(self, name: str, default: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.values is not None:
            return self.values.get(name, default)
        block = self.block_of.get(name)
        found = None if block is None else self.store.get(block, f"{name}/{self.kind}")
        return default if found is None else found

    def pop(self, name: str, default: torch.Tensor | None = None) -> torch.Tensor | None:
        """The statistic (from a held dict it is removed: its memory goes with the layer)."""
        if self.values is not None:
            return self.values.pop(name, default)
        return self.get(name, default)

    def __getitem__(self, name: str) -> torch.Tensor:
        found = self.get(name)
        if found is None:
            raise KeyError(f"no {self.kind} statistic for layer {name!r}")
        return found

    def __bool__(self) -> bool:
        return bool(self.values) if self.values is not None else bool(self.block_of)


@dataclass
class Calibration:
    """Stage 3's output, by layer name: Fisher diagonals ``[out, in]``, input Grams ``[in, in]``
    (the calibrated init's, K-FAC's and OPTQ's ``hessian=``), K-FAC output-gradient factors ``[out]``
    (:class:`LayerStats`, empty when not needed); ``blockwise``: they were collected block by block
    (:func:`lowra.blockwise.blockwise_statistics`) into ``store``'s files; the seconds spent
    (``ran``: a calibration pass happened, reported as ``calibration_s``)."""

    fisher: LayerStats = field(default_factory=lambda: LayerStats("fisher"))
    hessians: LayerStats = field(default_factory=lambda: LayerStats("hessian"))
    output_grads: LayerStats = field(default_factory=lambda: LayerStats("output_grad"))
    store: StatStore | None = None
    blockwise: bool = False
    seconds: float = 0.0
    ran: bool = False

    def close(self) -> None:
        """Remove the statistics' files (a temporary store)."""
        if self.store is not None:
            self.store.close()


def calibrate(model: nn.Module, targets: list[tuple[str, nn.Linear]], settings: Settings,
              calibration: torch.Tensor | None, source: WeightSource | None = None,
              store: StatStore | None = None) -> Calibration:
    """Stage 3: the calibration windows through the still full-precision model, if anything needs them.

    Block by block (:mod:`lowra.blockwise`, one block's weights and statistics at a time, the
    statistics in ``store``'s files: a temporary directory by default) for decoders whose blocks
    are found; a model without decoder blocks (e.g. a plain ``nn.Sequential``) in memory only, by
    the whole-model pass.  Layers whose quantizer options already hold ``hessian``/``inputs`` keep them.
    """
    from lowra.blockwise import StatStore, block_layout, blockwise_statistics

    needs = settings.needs
    if not needs.any:
        if calibration is not None and settings.method_object.quantizes:
            warnings.warn(f"method {settings.method!r} does not use calibration data; `calibration=` is ignored",
                          RuntimeWarning, stacklevel=3)
        return Calibration()
    if needs.layer_hessians and not needs.hessians and _has_data(settings.quant_options):
        return Calibration()
    names = [n for n, _ in targets]
    t0 = time.perf_counter()
    source = source or ModelSource(model)
    try:
        block_layout(model, names)
    except ValueError as exc:
        if not isinstance(source, ModelSource):
            raise ValueError(f"{needs.why} needs calibration statistics: {exc}") from None
        out = _whole_model_statistics(model, names, settings, calibration)
    else:
        store = store or StatStore()
        try:
            layout = blockwise_statistics(source, names, calibration, settings.calibration_batch_size, needs, store,
                                          settings.progress)
        except BaseException:
            store.close()
            raise
        out = calibration_from_store(store, layout)
    out.seconds, out.ran = time.perf_counter() - t0, True
    return out


def calibration_from_store(store: StatStore, layout: BlockLayout) -> Calibration:
    """The :class:`Calibration` of block-wise statistics in ``store`` (block ``i``: ``layout.targets[i]``)."""
    block_of = {n: i for i, block in enumerate(layout.targets) for n in block}
    stats = [LayerStats(kind, store, block_of) for kind in ("fisher", "hessian", "output_grad")]
    return Calibration(*stats, store=store, blockwise=True, ran=True)


def default_calibration(model: nn.Module, settings: Settings) -> torch.Tensor:
    """The calibration windows of a call that needs them and gave none: 64 windows of 256 tokens
    sampled from the full-precision model itself (:func:`lowra.calibration.sample_windows`, seed 0),
    logged; the runner always passes windows of its training text instead."""
    from lowra.calibration import SAMPLE_SEQ_LEN, SAMPLE_WINDOWS, sample_windows
    from lowra.progress import log

    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None) or SAMPLE_SEQ_LEN
    seq_len = min(SAMPLE_SEQ_LEN, int(max_len))
    log.info("%s needs calibration text and none was given: sampling %d windows of %d tokens from the model "
             "(pass calibration= to use real text)", settings.needs.why, SAMPLE_WINDOWS, seq_len)
    try:
        return sample_windows(model, SAMPLE_WINDOWS, seq_len, seed=0)
    except ValueError as exc:
        raise ValueError(f"{settings.needs.why} needs calibration data: {exc}") from None


def _has_data(opts: dict[str, Any]) -> bool:
    return opts.get("hessian") is not None or opts.get("inputs") is not None


def _whole_model_statistics(model: nn.Module, names: list[str], settings: Settings,
                            calibration: torch.Tensor | None) -> Calibration:
    """The statistics of a model without decoder blocks: one pass through the whole model in memory."""
    from lowra.error_tables import calibration_statistics

    needs = settings.needs
    stats = calibration_statistics(model, names, calibration, settings.calibration_batch_size, fisher=needs.fisher,
                                   hessians=needs.hessians or needs.layer_hessians,
                                   output_grads=needs.output_grads, wanted=needs.why, progress=settings.progress)
    return Calibration(LayerStats("fisher", values=stats.fisher), LayerStats("hessian", values=stats.hessians),
                       LayerStats("output_grad", values=stats.output_grads))


def new_report(settings: Settings, targets: list[tuple[str, nn.Linear]], calib: Calibration) -> QuantizationReport:
    """The report the stages fill: the settings, and ``times`` with one entry per stage."""
    report = QuantizationReport(
        method=settings.method,
        bits_target=float(settings.bits) if settings.method_object.quantizes else None,
        bits_nominal=0.0,
        bits_effective=0.0,
        rank=int(settings.rank),
        alpha=float(settings.alpha),
        loftq_iters=int(settings.loftq_iters),
        group_size=int(settings.group_size),
        double_quant=bool(settings.double_quant),
        candidates=tuple(settings.candidates),
        num_params=sum(m.weight.numel() for _, m in targets),
    )
    report.config = settings.config.to_dict()
    report.error_table = settings.error if settings.with_plan else None
    report.init = settings.init if settings.loftq_iters > 0 else "lora"
    report.budget_kind = settings.budget_kind
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


def error_tables(model: nn.Module, targets: list[tuple[str, nn.Linear]], settings: Settings, calib: Calibration,
                 calibration: torch.Tensor | None, report: QuantizationReport) -> ErrorTables:
    """Stage 4: per layer, ``learn_codebooks(W, bits=candidates)`` and its row error table
    (``quant.error``: weight SSE, Fisher, relative, K-FAC; ``measured`` scales Fisher shares by
    each layer's measured loss increase).  Times go to ``report.times``."""
    t0 = time.perf_counter()
    errors, params, costs = [], [], []
    codebooks: dict[str, dict[int, torch.Tensor]] = {}
    for name, linear in _progress(targets, "codebooks", settings.progress):
        codebooks[name], error = layer_table(name, linear.weight.detach(), settings, calib)
        errors.append(error)
        params.append(torch.full((linear.out_features,), linear.in_features, dtype=torch.int64))
        costs.append(row_costs(linear.out_features, linear.in_features, settings))
    group_size, double_quant, candidates = settings.group_size, settings.double_quant, settings.candidates
    report.times["codebooks_s"] = time.perf_counter() - t0
    if settings.error == "measured":
        from lowra.error_tables import measure_layer_losses, measured_row_table

        t0 = time.perf_counter()

        def dequantized(name: str, linear: nn.Module, b: int) -> torch.Tensor:
            w = linear.weight.detach()
            tables = {b: codebooks[name][b].to(w.device)}
            return QuantizedTensor.from_codebooks(w, b, tables, group_size, double_quant,
                                                  backend=settings.backend).dequantize(torch.float32)

        n_win = max(1, min(int(settings.measure_windows), int(torch.as_tensor(calibration).shape[0])))
        base_loss, increase = measure_layer_losses(model, targets, dequantized, candidates,
                                                   torch.as_tensor(calibration)[:n_win],
                                                   settings.calibration_batch_size)
        errors = [measured_row_table(increase[i], e, candidates) for i, e in enumerate(errors)]
        report.times["measure_s"] = time.perf_counter() - t0
        report.layer_loss_increase = {name: [float(v) for v in increase[i]] for i, (name, _) in enumerate(targets)}
    return ErrorTables(errors, params, costs, codebooks)


def layer_table(name: str, weight: torch.Tensor, settings: Settings,
                calib: Calibration) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """One layer of stage 4 (in memory and streamed alike): ``learn_codebooks(W, bits=candidates)``
    (Fisher-weighted with ``fisher_codebooks``) → ``({bits: codebook [out, 2**bits]} on CPU, the
    row error table [out, K])``; for ``error="measured"`` the table is the Fisher row errors (the
    shares :func:`error_tables` scales by the measured loss increases)."""
    from lowra.codebook import learn_codebooks
    from lowra.error_tables import kfac_row_errors, row_error_table

    importance = calib.fisher.pop(name, None)
    result = learn_codebooks(weight, bits=settings.candidates, group_size=settings.group_size,
                             iters=settings.codebook_iters, weight_power=settings.weight_power,
                             double_quant=settings.double_quant, importance=importance,
                             weigh_codebooks=settings.fisher_codebooks)
    codebooks = {b: c.cpu() for b, c in result.codebooks.items()}
    if settings.error == "kfac":
        h = calib.hessians[name] if settings.calibrated_init else calib.hessians.pop(name)
        h = h.to(torch.float32)  # what kfac_row_errors multiplies by; the float64 copy is freed here
        error = kfac_row_errors(weight, result.codebooks, settings.candidates, settings.group_size,
                                settings.double_quant,
                                calib.output_grads.pop(name), h)
    elif settings.error == "measured":
        error = result.error.cpu()
    else:
        error = row_error_table(settings.error, result.error, weight).cpu()
    return codebooks, error


def row_costs(out_features: int, in_features: int, settings: Settings) -> torch.Tensor:
    """Stored bits ``[out, K]`` of each row of a layer at each candidate width (``budget_kind="effective"``)."""
    from lowra.format import row_storage_bits

    row = [row_storage_bits(in_features, b, settings.group_size, settings.double_quant) for b in settings.candidates]
    return torch.tensor(row, dtype=torch.int64).expand(out_features, -1)


# -------------------------------------------------------------------------------- 5. plan
def plan_precision(targets: list[tuple[str, nn.Linear]], tables: ErrorTables, settings: Settings,
                   report: QuantizationReport) -> dict[str, torch.Tensor]:
    """Stage 5: one ``assign_precision`` over the rows of all layers; int64 bits ``[out]`` per layer.

    The solve info goes to ``report.plan``; the error tables are released afterwards.  With
    ``budget_kind="effective"`` every row costs its stored bits (``tables.costs``), so the budget
    counts every stored bit.
    """
    t0 = time.perf_counter()
    if settings.progress:
        from lowra.progress import log as progress_log

        progress_log.info("plan: %d rows of %d layers at %g bits (%s budget)", sum(e.shape[0] for e in tables.errors),
                          len(tables.errors), settings.bits, settings.budget_kind)
    try:
        with activity("plan", settings.progress):
            per_layer, report.plan = solve_plan(tables.errors, tables.params, settings.bits, settings.candidates,
                                                 settings.budget_scope, dict(settings.plan_options),
                                                 tables.costs if settings.budget_kind == "effective" else None)
    except ValueError as exc:
        if settings.budget_kind != "effective":
            raise
        raise ValueError(f"quant.budget_kind=effective, bits={settings.bits}: {exc}") from exc
    layer_bits = {name: b for (name, _), b in zip(targets, per_layer)}
    tables.errors, tables.params = [], []
    report.times["plan_s"] = time.perf_counter() - t0
    if settings.progress:
        progress_log.info("plan: %.1f s, %.3f bits, gap to the LP bound %.2e (%s)", report.times["plan_s"],
                          report.plan.get("average_bits", float("nan")), report.plan.get("gap", float("nan")),
                          report.plan.get("info", {}).get("plan_source", "?"))
    return layer_bits


def solve_plan(
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


def _code_bit_budget(settings: Settings, layer_bits: dict[str, torch.Tensor], in_features: dict[str, int]) -> float:
    """The code-bit budget ``low_bits_init`` compares: ``bits`` for a nominal budget (the plan may
    fall a hair below it) or without a plan; for ``budget_kind="effective"`` the plan's mean code
    width, weighted by parameters (``layer_bits``: bits ``[out]`` per layer, ``in_features`` by layer)."""
    if not layer_bits or settings.budget_kind == "nominal":
        return float(settings.bits)
    total = sum(int(b.sum()) * in_features[n] for n, b in layer_bits.items())
    return total / sum(b.numel() * in_features[n] for n, b in layer_bits.items())


def init_for_plan(settings: Settings, layer_bits: dict[str, torch.Tensor], in_features: dict[str, int],
                  report: QuantizationReport) -> Settings:
    """The settings the init runs with, once the plan (``layer_bits``, empty without one) is known:
    ``low_bits_init``'s alternations and codebooks when the code-bit budget is below its ``below``
    (LowRA, rank > 0), else ``settings``.

    ``report.loftq_iters`` / ``init_codebooks`` say what ran and ``report.low_bits_init`` whether
    the rule applied.
    """
    low = settings.low_bits_init
    applies = (bool(low) and settings.rank > 0
               and _code_bit_budget(settings, layer_bits, in_features) < low["below"])
    if applies:
        learned = settings.config.codebook == "learned"  # NormalFloat tables (codebook="nf") are never relearned
        settings = replace(settings, loftq_iters=int(low["loftq_iters"]),
                    init_codebooks=str(low["init_codebooks"]) if learned else "fixed")
    report.low_bits_init = applies
    report.loftq_iters = int(settings.loftq_iters)
    report.init_codebooks = settings.init_codebooks
    report.init = settings.init if settings.loftq_iters > 0 else "lora"
    return settings


# ------------------------------------------------------------------------------ 7. report
def finish_report(model: nn.Module, settings: Settings, report: QuantizationReport, layer_reports: list[LayerReport],
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
    model.lowra_config = settings.config
    return report
