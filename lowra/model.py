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
"""

from __future__ import annotations

import re
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lowra.format import QuantizedTensor
from lowra.loftq import loftq_init
from lowra.nn import LowRALinear
from lowra.validation import check_budget, check_weight

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LayerReport",
    "QuantizationReport",
    "find_target_linears",
    "lora_parameters",
    "lowra_layers",
    "mark_only_lora_trainable",
    "quantize_model",
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
METHOD_NONE = "none"


# ---------------------------------------------------------------------------------- reports
@dataclass
class LayerReport:
    """What happened to one target layer (bits are of the base weight only)."""

    name: str
    shape: tuple[int, int]
    bits_histogram: dict[int, int]
    nominal_bits: float
    effective_bits: float
    sse_quant: float
    sse_loftq: float
    loftq_best_iter: int = 0


@dataclass
class QuantizationReport:
    """Summary of ``quantize_model``; ``to_dict()`` is JSON-able.

    ``bits_nominal`` / ``bits_effective`` are weighted by parameter count over the quantized
    layers (code bits only / every stored byte). ``total_sse`` is ``Σ‖W − deq(Q) − s·BA‖²`` after
    LoftQ and ``total_sse_quant`` the same without adapters. ``plan`` holds the planner's solve
    info (objective, lower bound, gap, solve time, …) for ``method="lowra"``.
    """

    method: str
    bits_target: float | None
    bits_nominal: float
    bits_effective: float
    rank: int
    alpha: float
    loftq_iters: int
    group_size: int
    double_quant: bool
    candidates: tuple[int, ...]
    num_params: int
    layers: list[LayerReport] = field(default_factory=list)
    total_sse_quant: float = 0.0
    total_sse: float = 0.0
    plan: dict[str, Any] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    error_table: str | None = None
    layer_loss_increase: dict[str, list[float]] = field(default_factory=dict)
    init: str = "loftq"
    budget_kind: str = "nominal"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples → lists, int keys → str)."""
        d = asdict(self)
        d["candidates"] = list(self.candidates)
        for layer in d["layers"]:
            layer["shape"] = list(layer["shape"])
            layer["bits_histogram"] = {str(k): v for k, v in layer["bits_histogram"].items()}
        d["plan"] = _jsonable(self.plan)
        return d


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() > 1 else value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# ---------------------------------------------------------------------------------- targets
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


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


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


# ---------------------------------------------------------------------------------- quantize
def _progress(iterable, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="layer", leave=False)


def _integer_bits(bits: float, method: str) -> int:
    if float(bits) != round(float(bits)):
        raise ValueError(
            f"method {method!r} quantizes every row at one integer width, got bits={bits}; a "
            "fractional budget needs method='lowra' (per-row precision plan)"
        )
    return int(round(float(bits)))


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
            RuntimeWarning, stacklevel=3,
        )
    return [torch.from_numpy(b.astype("int64")) for b in plan.split(sizes)], info


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
    if codebook not in ("learned", "nf"):
        raise ValueError(f"codebook must be 'learned' or 'nf', got {codebook!r}")
    if plan not in ("ilp", "uniform"):
        raise ValueError(f"plan must be 'ilp' or 'uniform', got {plan!r}")
    use_plan = bool(use_plan) and plan == "ilp"
    from lowra.error_tables import DATA_TABLES, ERROR_TABLES, INITS

    if error not in ERROR_TABLES:
        raise ValueError(f"quant.error must be one of {ERROR_TABLES}, got {error!r}")
    if init not in INITS:
        raise ValueError(f"quant.init must be one of {INITS}, got {init!r}")
    if error != "sse" and method != "lowra":
        raise ValueError(f"quant.error={error!r} is an error table of LowRA's planner; method {method!r} has none")
    if fisher_codebooks and error != "fisher":
        raise ValueError("fisher_codebooks=True needs error='fisher' (the Fisher diagonal weights the fit)")
    if method == "lowra" and codebook == "nf":
        codebook_iters = 0  # learn_codebooks(iters=0) returns the NormalFloat tables and their errors
    if budget_kind not in ("nominal", "effective"):
        raise ValueError(f"quant.budget_kind must be 'nominal' or 'effective', got {budget_kind!r}")
    if budget_kind == "effective" and not (method == "lowra" and use_plan):
        raise ValueError("quant.budget_kind=effective needs method='lowra' with a precision plan (plan='ilp'); "
                         "other methods store one fixed width and report their effective bits as they are")
    if method != METHOD_NONE:
        bits = check_budget(bits, high=16.0 if budget_kind == "effective" else 4.0)
        if method == "lowra" and not use_plan and float(bits) != round(float(bits)):
            raise ValueError(
                f"plan='uniform' (use_plan=False) stores every row at one integer width, got a fractional "
                f"budget bits={bits}; use plan='ilp' (the precision plan) or an integer budget"
            )
        if budget_kind == "nominal" and (method != "lowra" or not use_plan):
            int_bits = _integer_bits(bits, method)
            if method == "lowra" and int_bits not in candidates:
                candidates = tuple(sorted({*candidates, int_bits}))
        if budget_scope not in ("model", "matrix"):
            raise ValueError(f"budget_scope must be 'model' or 'matrix', got {budget_scope!r}")
        candidates = tuple(int(b) for b in candidates)
    needs_calibration = False
    if method not in ("lowra", METHOD_NONE):
        from lowra.quantizers import get_quantizer

        # unknown method → ValueError before any work
        needs_calibration = bool(getattr(get_quantizer(method), "needs_calibration", False))
    layer_options = {k: dict(v) for k, v in (layer_options or {}).items()}
    if isinstance(rank, bool) or int(rank) != rank or rank < 0:
        raise ValueError(f"rank must be a non-negative integer, got {rank!r}")
    if loftq_iters and rank == 0:
        loftq_iters = 0
    targets = find_target_linears(model, target_modules, skip_modules)
    for name, linear in targets:
        check_weight(linear.weight, f"layer {name!r} weight")
        if linear.bias is not None:
            check_weight(linear.bias[None], f"layer {name!r} bias")
        if rank > min(linear.in_features, linear.out_features):
            raise ValueError(f"layer {name!r} {tuple(linear.weight.shape)} is too small for rank {rank}")
    t_calib = 0.0
    if needs_calibration:
        t0 = time.perf_counter()
        _add_calibration_hessians(model, targets, method, calibration, calibration_batch_size, layer_options,
                                  quant_options)
        t_calib = time.perf_counter() - t0
    calibrated_init = init == "calibrated" and loftq_iters > 0
    table_needs_data = method == "lowra" and use_plan and error in DATA_TABLES
    fisher_needed = method == "lowra" and ((table_needs_data and error in ("fisher", "measured")) or fisher_codebooks)
    stats_needed = method != METHOD_NONE and (table_needs_data or calibrated_init or fisher_needed)
    fisher: dict[str, torch.Tensor] = {}
    hessians: dict[str, torch.Tensor] = {}
    out_grads: dict[str, torch.Tensor] = {}
    if stats_needed:
        from lowra.error_tables import calibration_statistics

        t0 = time.perf_counter()
        stats = calibration_statistics(
            model, [n for n, _ in targets], calibration, calibration_batch_size,
            fisher=fisher_needed,
            hessians=calibrated_init or (table_needs_data and error == "kfac"),
            output_grads=table_needs_data and error == "kfac",
            wanted=f"quant.error={error}" if table_needs_data or fisher_needed else "quant.init=calibrated",
        )
        fisher, hessians, out_grads = stats.fisher, stats.hessians, stats.output_grads
        t_calib += time.perf_counter() - t0
    elif calibration is not None and method != METHOD_NONE and not needs_calibration:
        warnings.warn(f"method {method!r} does not use calibration data; `calibration=` is ignored",
                      RuntimeWarning, stacklevel=2)
    report = QuantizationReport(
        method=method,
        bits_target=None if method == METHOD_NONE else float(bits),
        bits_nominal=0.0,
        bits_effective=0.0,
        rank=int(rank),
        alpha=float(alpha),
        loftq_iters=int(loftq_iters),
        group_size=int(group_size),
        double_quant=bool(double_quant),
        candidates=tuple(candidates),
        num_params=sum(m.weight.numel() for _, m in targets),
    )
    report.error_table = error if method == "lowra" and use_plan else None
    report.init = init if loftq_iters > 0 else "lora"
    report.budget_kind = budget_kind
    times = {"codebooks_s": 0.0, "plan_s": 0.0, "quantize_s": 0.0, "loftq_s": 0.0}
    if needs_calibration or stats_needed:
        times["calibration_s"] = t_calib
    module_kw = dict(rank=rank, alpha=alpha, dropout=dropout, adapter_dtype=adapter_dtype, backend=backend)

    # ---- phase 1 + 2 (LowRA with a plan): codebooks / error tables, then one precision plan
    layer_bits: dict[str, torch.Tensor | int] = {}
    codebooks: dict[str, dict[int, torch.Tensor]] = {}
    if method == "lowra" and use_plan:
        from lowra.codebook import learn_codebooks

        t0 = time.perf_counter()
        errors, params, costs = [], [], []
        from lowra.error_tables import kfac_row_errors, row_error_table
        from lowra.format import row_storage_bits

        for name, linear in _progress(targets, "codebooks", progress):
            importance = fisher.pop(name, None)
            result = learn_codebooks(
                linear.weight.detach(), bits=candidates, group_size=group_size, iters=codebook_iters,
                weight_power=weight_power, double_quant=double_quant, importance=importance,
                weigh_codebooks=fisher_codebooks,
            )
            codebooks[name] = {b: c.cpu() for b, c in result.codebooks.items()}
            if error == "kfac":
                h = hessians[name] if calibrated_init else hessians.pop(name)
                errors.append(kfac_row_errors(linear.weight.detach(), result.codebooks, candidates, group_size,
                                              double_quant, out_grads.pop(name), h))
            elif error == "measured":
                errors.append(result.error.cpu())  # Fisher row errors: the shares, scaled below
            else:
                errors.append(row_error_table(error, result.error, linear.weight.detach()).cpu())
            params.append(torch.full((linear.out_features,), linear.in_features, dtype=torch.int64))
            row_cost = [row_storage_bits(linear.in_features, b, group_size, double_quant) for b in candidates]
            costs.append(torch.tensor(row_cost, dtype=torch.int64).expand(linear.out_features, -1))
        times["codebooks_s"] = time.perf_counter() - t0
        if error == "measured":
            from lowra.error_tables import measure_layer_losses, measured_row_table

            t0 = time.perf_counter()

            def dequantized(name: str, linear: nn.Module, b: int) -> torch.Tensor:
                w = linear.weight.detach()
                tables = {b: codebooks[name][b].to(w.device)}
                return QuantizedTensor.from_codebooks(w, b, tables, group_size, double_quant,
                                                      backend=backend).dequantize(torch.float32)

            n_win = max(1, min(int(measure_windows), int(torch.as_tensor(calibration).shape[0])))
            base_loss, increase = measure_layer_losses(model, targets, dequantized, candidates,
                                                       torch.as_tensor(calibration)[:n_win], calibration_batch_size)
            errors = [measured_row_table(increase[i], e, candidates) for i, e in enumerate(errors)]
            times["measure_s"] = time.perf_counter() - t0
            report.layer_loss_increase = {name: [float(v) for v in increase[i]] for i, (name, _) in enumerate(targets)}
        t0 = time.perf_counter()
        try:
            per_layer, report.plan = _solve_plan(errors, params, bits, candidates, budget_scope,
                                                 dict(plan_options or {}),
                                                 costs if budget_kind == "effective" else None)
        except ValueError as exc:
            if budget_kind != "effective":
                raise
            raise ValueError(f"quant.budget_kind=effective, bits={bits}: {exc}") from exc
        layer_bits = {name: b for (name, _), b in zip(targets, per_layer)}
        del errors, params
        times["plan_s"] = time.perf_counter() - t0

    # ---- phase 3: quantize + LoftQ + swap, one layer at a time
    layer_reports = []
    for name, linear in _progress(targets, f"quantize ({method})", progress):
        weight = linear.weight.detach()
        if method == METHOD_NONE:
            new = LowRALinear.from_linear(linear, **module_kw)
            layer_reports.append(LayerReport(name, tuple(weight.shape), {}, new.nominal_bits,
                                             new.effective_bits, 0.0, 0.0))
        else:
            quantize_fn = _layer_quantizer(
                method, layer_bits.get(name), codebooks.pop(name, None), bits, group_size,
                double_quant, codebook_iters, weight_power, backend, weight.device,
                {**quant_options, **layer_options.pop(name, {})},
                importance=fisher.pop(name, None) if fisher_codebooks else None,
            )
            spent = [0.0]

            def timed(m: torch.Tensor, fn=quantize_fn, spent=spent) -> QuantizedTensor:
                t = time.perf_counter()
                out = fn(m)
                spent[0] += time.perf_counter() - t
                return out

            t0 = time.perf_counter()
            result = loftq_init(weight, timed, rank, alpha, iters=loftq_iters, name=f"layer {name!r}",
                                hessian=hessians.pop(name, None) if calibrated_init else None, damp=init_damp)
            times["quantize_s"] += spent[0]
            times["loftq_s"] += time.perf_counter() - t0 - spent[0]
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
        _set_module(model, name, new)
        del linear, weight

    mark_only_lora_trainable(model)
    report.layers = layer_reports
    total = report.num_params
    shapes = [lr.shape[0] * lr.shape[1] for lr in layer_reports]
    report.bits_nominal = sum(lr.nominal_bits * n for lr, n in zip(layer_reports, shapes)) / total
    report.bits_effective = sum(lr.effective_bits * n for lr, n in zip(layer_reports, shapes)) / total
    report.total_sse_quant = sum(lr.sse_quant for lr in layer_reports)
    report.total_sse = sum(lr.sse_loftq for lr in layer_reports)
    times["total_s"] = time.perf_counter() - t_start
    report.times = times
    model.lowra_report = report
    return report


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


def _layer_quantizer(
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
):
    """The ``[out, in] → QuantizedTensor`` used by LoftQ for one layer (codebooks/bits fixed).

    ``importance``: Fisher diagonal for LowRA without a plan and ``fisher_codebooks``.
    """
    if method == "lowra" and bits_per_row is not None:
        bits_dev = bits_per_row.to(device)
        tables = {b: codebooks[b].to(device) for b in torch.unique(bits_per_row).tolist()}
        return lambda m: QuantizedTensor.from_codebooks(
            m, bits_dev, tables, group_size, double_quant, method="lowra", backend=backend
        )
    from lowra.quantizers import quantize

    int_bits = _integer_bits(bits, method)
    if method == "lowra":
        # no plan: learn this layer's codebooks once, then keep them fixed through LoftQ
        from lowra.codebook import learn_codebooks

        state: dict[str, Any] = {}

        def fixed(m: torch.Tensor) -> QuantizedTensor:
            if "tables" not in state:
                learned = learn_codebooks(m, bits=(int_bits,), group_size=group_size, iters=codebook_iters,
                                          weight_power=weight_power, double_quant=double_quant,
                                          importance=importance, weigh_codebooks=importance is not None)
                state["tables"] = learned.codebooks
            return QuantizedTensor.from_codebooks(m, int_bits, state["tables"], group_size, double_quant,
                                                  method="lowra", backend=backend)

        return fixed
    return lambda m: quantize(m, int_bits, method=method, group_size=group_size, double_quant=double_quant,
                              backend=backend, **quant_options)
