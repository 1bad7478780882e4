"""Error tables for the precision planner: what a row costs at each candidate width.

``assign_precision`` minimizes ``Σ rows cost[row, width]`` under a bit budget and is agnostic to
what the cost means. The paper's cost is the weight SSE of each row, which is *not* comparable
across layers: layers of small norm (v_proj, o_proj on Llama models) have tiny SSE at every width,
so a model-wide plan starves them, although their errors feed the residual stream directly.
Tables offered (``quant.error=``):

``sse``
    ``Σⱼ (Wᵢⱼ − Q_b(W)ᵢⱼ)²`` — data-free, the paper's objective.
``fisher``
    ``Σⱼ Fᵢⱼ (Wᵢⱼ − Q_b(W)ᵢⱼ)²`` with ``F`` the diagonal empirical Fisher (squared gradients of
    the LM loss, ``lowra.calibration.collect_fisher``): a second-order estimate of the loss
    increase, comparable across layers by construction.
``relative``
    ``SSE / mean(W_layer²)`` — data-free; each layer's error in units of its own weight energy,
    so every layer is judged by its *relative* distortion, weighted by its parameter count.
``measured``
    the loss increase actually measured on calibration text when ONE layer is quantized at width
    ``b`` (all its rows, the learned codebooks, the rest of the model in full precision), split
    among the layer's rows in proportion to their diagonal-Fisher row errors. Second-order tables
    are additive approximations that fail exactly where the plan makes its boldest moves (1-bit
    rows); measuring each layer's true damage puts layers on one scale, the Fisher share keeps the
    per-row resolution inside a layer. Costs ``layers × candidates`` forward passes over the
    measurement windows.
``kfac``
    ``Gᵢ · ΔWᵢ H ΔWᵢᵀ`` with ``H = E[x xᵀ]`` the input Gram and ``Gᵢ = E[(∂L/∂yᵢ)²]`` the output
    gradient energy of row ``i``: the row block of the Kronecker-factored Fisher ``G ⊗ H``
    (K-FAC). Unlike the diagonal Fisher it sees input correlations (errors that cancel through
    correlated inputs, as OPTQ exploits), and unlike a bare output error ``ΔW H ΔWᵀ`` it is
    comparable across layers (``G`` carries each row's effect on the loss).

All tables are computed for every candidate width at once from ``learn_codebooks`` (the Fisher
one by passing ``importance=F``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "DATA_TABLES", "ERROR_TABLES", "INITS", "CalibrationStatistics", "calibration_statistics", "kfac_row_errors",
    "measure_layer_losses", "measured_row_table", "row_error_table",
]

ERROR_TABLES = ("sse", "fisher", "relative", "kfac", "measured")
#: tables that need calibration text (a Fisher / statistics pass)
DATA_TABLES = ("fisher", "kfac", "measured")
INITS = ("loftq", "calibrated")


def row_error_table(kind: str, error: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Planner cost ``[out, K]`` of one layer from its ``learn_codebooks`` error table.

    ``error [out, K]`` is the row SSE per candidate (Fisher-weighted already for ``fisher``);
    ``weight [out, in]`` is the full-precision weight (used by ``relative``).
    """
    if kind not in ERROR_TABLES:
        raise ValueError(f"quant.error must be one of {ERROR_TABLES}, got {kind!r}")
    if error.dim() != 2 or error.shape[0] != weight.shape[0]:
        raise ValueError(f"error table must be [{weight.shape[0]}, candidates], got {tuple(error.shape)}")
    if kind in ("kfac", "measured"):
        raise ValueError(f"quant.error={kind} is computed from calibration statistics, not by row_error_table")
    if kind == "relative":
        energy = float(weight.detach().to(torch.float64).pow(2).mean())
        if not energy > 0:
            raise ValueError("quant.error=relative: a layer's weight is all zeros")
        return error / energy
    return error


#: elements of one row chunk of ``kfac_row_errors`` (its fp32 / float64 temporaries are this size, so
#: a 28672-wide layer needs no [out, in] float64 copy)
KFAC_CHUNK_ELEMENTS = 1 << 22


def kfac_row_errors(
    weight: torch.Tensor,
    codebooks: dict[int, torch.Tensor],
    candidates: Sequence[int],
    group_size: int,
    double_quant: bool,
    output_grad_sq: torch.Tensor,
    hessian: torch.Tensor,
) -> torch.Tensor:
    """K-FAC row cost ``[out, K]`` float64: ``Gᵢ · Δᵢ H Δᵢᵀ`` at each candidate width.

    The product ``Δ H`` runs in fp32 (relative error ~1e-6, far below the sampling error of ``H``
    from a few thousand calibration tokens), its row sums with ``Δ`` and ``G`` in float64.

    ``Δ = W − deq(Q_b(W))`` with every row at width ``b`` and its learned codebook (exactly what
    would be stored); ``output_grad_sq [out]``, ``hessian [in, in]`` from
    ``lowra.calibration.collect_fisher(..., hessians=True, output_grads=True)``.
    """
    from lowra.format import dequantized_at
    from lowra.scales import GroupScales, compute_absmax

    out_features, in_features = weight.shape
    if tuple(hessian.shape) != (in_features, in_features) or tuple(output_grad_sq.shape) != (out_features,):
        raise ValueError(f"quant.error=kfac: statistics of shape H {tuple(hessian.shape)}, G "
                         f"{tuple(output_grad_sq.shape)} do not fit a weight {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    h = hessian.to(device=w.device, dtype=torch.float32)  # an fp32 product: float64 GEMMs cost 2-4× more on a CPU
    g = output_grad_sq.to(device=w.device, dtype=torch.float64)
    table = torch.empty(out_features, len(candidates), dtype=torch.float64)
    step = max(1, KFAC_CHUNK_ELEMENTS // in_features)  # rows per chunk: temporaries bounded, not [out, in]
    absmax = GroupScales.store(compute_absmax(w, group_size), double_quant).restore()  # of every row (double quant)
    for k, b in enumerate(candidates):
        book = codebooks[int(b)].to(w.device)
        for start in range(0, out_features, step):
            rows = slice(start, start + step)
            wr = w[rows]
            d = wr - dequantized_at(wr, int(b), book if book.shape[0] == 1 else book[rows], group_size,
                                    absmax=absmax[rows])
            table[rows, k] = (g[rows] * ((d @ h).double() * d.double()).sum(1)).clamp_min(0.0).cpu()
    return table


@dataclass
class CalibrationStatistics:
    """Per-layer statistics from one calibration pass (empty dicts where not requested).

    ``fisher {name: fp32 [out, in]}``, ``hessians {name: float64 [in, in]}``,
    ``output_grads {name: float64 [out]}``.
    """

    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    output_grads: dict[str, torch.Tensor] = field(default_factory=dict)


def calibration_statistics(
    model: nn.Module,
    names: Sequence[str],
    calibration: torch.Tensor | None,
    batch_size: int,
    fisher: bool,
    hessians: bool,
    output_grads: bool = False,
    wanted: str = "quant.error=fisher",
    progress: bool = False,
) -> CalibrationStatistics:
    """One pass over the calibration windows: Fisher diagonals, input Hessians, output gradients.

    ``calibration``: int64 token windows ``[samples, seq_len]`` of the training stream, run in
    chunks of ``batch_size`` windows. Forward only when only Hessians are wanted, else forward and
    backward through the LM loss. ``wanted`` names the option that needs the data in errors.
    ``progress``: report the chunks done (``lowra.progress``).
    """
    from lowra.calibration import calibration_batches, collect_fisher, collect_hessians
    from lowra.progress import progress as with_progress

    batches = with_progress(calibration_batches(calibration, batch_size, wanted), "calibration", progress,
                            unit="chunk")
    if fisher or output_grads:
        out = collect_fisher(model, batches, list(names), hessians=hessians, output_grads=output_grads,
                             diagonal=fisher)
        return CalibrationStatistics(*out)
    return CalibrationStatistics(hessians=collect_hessians(model, batches, list(names)))


@torch.no_grad()
def _mean_loss(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Token-weighted mean next-token NLL of ``model`` over ``batches`` of ``input_ids [B, T]``."""
    total, count = 0.0, 0
    for ids in batches:
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += float(model(input_ids=ids, labels=ids).loss) * n
        count += n
    return total / count


@torch.no_grad()
def measure_layer_losses(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Linear]],
    dequantized: Callable[[str, nn.Linear, int], torch.Tensor],
    candidates: Sequence[int],
    windows: torch.Tensor,
    batch_size: int,
) -> tuple[float, torch.Tensor]:
    """Loss increase ``[layers, K]`` (float64) with one layer at a time quantized at each width.

    ``dequantized(name, linear, b)`` returns that layer's weight with every row at width ``b``
    (what would be stored). The weight is swapped in place and restored bit-exactly; the model
    is in eval mode throughout. Returns ``(fp loss, increases)``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = [w.to(device) for w in torch.as_tensor(windows).split(int(batch_size))]
    try:
        base = _mean_loss(model, batches)
        out = torch.empty(len(layers), len(candidates), dtype=torch.float64)
        for i, (name, linear) in enumerate(layers):
            saved = linear.weight.data.clone()
            try:
                for k, b in enumerate(candidates):
                    linear.weight.data.copy_(saved)  # each width quantizes the full-precision weight
                    linear.weight.data.copy_(dequantized(name, linear, int(b)).to(saved.dtype))
                    out[i, k] = _mean_loss(model, batches) - base
            finally:
                linear.weight.data.copy_(saved)
    finally:
        model.train(was_training)
    if not bool(torch.isfinite(out).all()):
        raise ValueError("quant.error=measured: a quantized layer gave a non-finite calibration loss")
    return base, out


def measured_row_table(
    layer_increase: torch.Tensor, row_error: torch.Tensor, candidates: Sequence[int]
) -> torch.Tensor:
    """Split one layer's measured loss increase ``[K]`` among its rows by ``row_error [out, K]``.

    The increase is made non-negative and non-increasing in the width first (a wider code never
    costs more loss; a tiny negative increase is measurement luck, not a gain to plan on). A row's
    share at width ``b`` is its error over the layer's total error at ``b``.
    """
    if row_error.dim() != 2 or row_error.shape[1] != len(candidates) or layer_increase.numel() != len(candidates):
        raise ValueError(f"row_error must be [out, {len(candidates)}], got {tuple(row_error.shape)}")
    order = sorted(range(len(candidates)), key=lambda k: candidates[k])
    inc = layer_increase.to(torch.float64).clamp_min(0.0).clone()
    for a, b in zip(order, order[1:]):  # narrower → wider: cumulative minimum
        inc[b] = torch.minimum(inc[b], inc[a])
    err = row_error.to(torch.float64)
    total = err.sum(0, keepdim=True)
    share = torch.where(total > 0, err / total.clamp_min(1e-300), torch.full_like(err, 1.0 / err.shape[0]))
    return share * inc[None, :]
