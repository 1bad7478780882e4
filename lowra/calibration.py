"""Calibration data for quantizers that need it (OPTQ, ModuLoRA's ``quant=modulora``).

``calibration_windows`` draws a few hundred random token windows from the training stream (GPTQ
uses 128 random 2048-token segments of C4; we draw from the fine-tuning data itself).
``collect_hessians`` runs them through the full-precision model with forward hooks on the target
linears and returns each layer's input Hessian ``H = XᵀX / n`` ``[in, in]`` in float64 (``n``: the
number of token positions seen, padding excluded), ready for ``optq_quantize(..., hessian=H)``.
``collect_fisher`` runs them forward AND backward through the LM loss and returns each target
weight's diagonal empirical Fisher ``F = mean over chunks of (∂L/∂W)²`` ``[out, in]`` (fp32), the
importance of LowRA's loss-aware error table (``quant.error=fisher``); it can collect the input
Hessians in the same pass (``hessians=True``), so one calibration stage feeds both the planner and
the calibrated adapter init.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["calibration_batches", "calibration_windows", "collect_fisher", "collect_hessians"]


def calibration_windows(stream: torch.Tensor, n_samples: int = 256, seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    """``n_samples`` random windows ``[n_samples, seq_len]`` (int64) of a 1-D token ``stream [N]``.

    Windows start at uniformly drawn offsets (a fixed-seed generator, so runs are reproducible)
    and may overlap. Raises ValueError when the stream is shorter than one window.
    """
    stream = torch.as_tensor(stream).reshape(-1).to(torch.int64)
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"need n_samples ≥ 1 and seq_len ≥ 1, got {n_samples}, {seq_len}")
    if stream.numel() < seq_len:
        raise ValueError(f"calibration stream has {stream.numel()} tokens, fewer than one window of {seq_len}")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, stream.numel() - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def calibration_batches(calibration: Any, batch_size: int, wanted: str) -> tuple[torch.Tensor, ...]:
    """Check ``calibration`` (int64 token windows ``[samples, seq_len]``) and split it into chunks.

    ``wanted`` names what needs the data (``"quant.error=fisher"``, ``"method 'optq'"``) in the
    ValueError raised for missing windows, a wrong shape or dtype, or a bad ``batch_size``.
    """
    if calibration is None:
        raise ValueError(
            f"{wanted} needs calibration data: pass `calibration=` (int64 token windows [samples, seq_len], "
            "e.g. lowra.calibration.calibration_windows of the training stream)"
        )
    calibration = torch.as_tensor(calibration)
    if calibration.dim() == 1:
        calibration = calibration[None]
    if calibration.dim() != 2 or calibration.shape[0] == 0 or calibration.dtype.is_floating_point:
        raise ValueError(f"{wanted}: `calibration=` must be integer token windows [samples, seq_len], got "
                         f"{calibration.dtype} {tuple(calibration.shape)}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"calibration_batch_size must be a positive integer, got {batch_size!r}")
    return calibration.split(int(batch_size))


def _target_linears(model: nn.Module, target_modules: Any) -> list[tuple[str, nn.Linear]]:
    from lowra.layers import find_target_linears

    return find_target_linears(model, target_modules)


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    target_modules: str | list[str] | tuple[str, ...] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Input Hessians ``{layer name: float64 [in, in]}`` of the target linears of ``model``.

    Args:
        model: the full-precision model (its mode is restored afterwards; run in eval mode).
        batches: ``input_ids [B, T]`` tensors, or dicts of model inputs; with an
            ``attention_mask [B, T]`` only the unmasked positions count.
        target_modules: as ``lowra.layers.find_target_linears`` (None: the model type's defaults).
        device: where the inputs go (default: the model's first parameter's device).
    Returns:
        ``H = Σ xᵀx / n`` over every token position ``x [in]`` that reached the layer (float64,
        accumulated on the layer's device). Raises ValueError if no batch was given.
    """
    targets = _target_linears(model, target_modules)
    if device is None:
        device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, _output: Any) -> None:
            x = args[0].detach()
            mask = state["mask"]
            if mask is not None and mask.shape == x.shape[:-1]:
                x = x[mask.to(torch.bool)]
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                counts[name] = 0
            sums[name].addmm_(x.T, x)
            counts[name] += x.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in targets]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            if isinstance(batch, Mapping):
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                state["mask"] = inputs.get("attention_mask")
                model(**inputs)
            else:
                state["mask"] = None
                model(batch.to(device))
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not seen:
        raise ValueError("collect_hessians got no calibration batches")
    missing = [n for n, _ in targets if n not in sums]
    if missing:
        raise ValueError(f"no calibration activations reached {missing[:5]} (are they used in forward?)")
    return {n: sums[n] / max(counts[n], 1) for n, _ in targets}


def collect_fisher(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    target_modules: str | list[str] | tuple[str, ...] | None = None,
    hessians: bool = False,
    device: torch.device | str | None = None,
    output_grads: bool = False,
    diagonal: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | tuple[dict[str, torch.Tensor], ...]:
    """Diagonal empirical Fisher of every target weight (and optionally its input Hessian).

    Each batch ``input_ids [B, T]`` is one chunk: the causal-LM loss (mean over its predicted
    tokens) is back-propagated to the target weights only (everything else keeps its
    ``requires_grad``; no parameter is updated), and ``grad²`` is accumulated. Memory: one fp32
    gradient and one fp32 accumulator per target weight (≤ 2× the targets in fp32), plus the
    activations of one chunk.

    Args:
        model: a full-precision causal LM (HF ``labels=`` API); its mode is restored afterwards.
        batches: token chunks ``[B, T]`` (e.g. ``calibration_windows(...).split(4)``).
        target_modules: as ``lowra.layers.find_target_linears``.
        hessians: also return ``H = Σ xᵀx / n`` ``[in, in]`` float64 per target (forward hooks;
            layers that read the same input tensor, as q/k/v do, share one Gram object).
        device: where the inputs go (default: the model's first parameter's device).
        output_grads: also return ``G = mean over tokens of (∂L/∂y)²`` float64 ``[out]`` per target
            (the output factor of the Kronecker-factored Fisher ``G ⊗ H``; ``quant.error=kfac``).
        diagonal: accumulate the diagonal Fisher (False: ``fisher`` comes back empty, saving one
            fp32 copy of the targets when only ``G``/``H`` are wanted).
    Returns:
        ``(fisher {name: fp32 [out, in] on CPU}, hessians {name: float64 [in, in]} or {})``, and
        ``output_grads {name: float64 [out]}`` as a third item when requested.
    Raises:
        ValueError: no batch, or a non-finite gradient (naming the layer and the option).
    """
    targets = _target_linears(model, target_modules)
    if device is None:
        device = next(model.parameters()).device
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    target_ids = {id(m.weight) for _, m in targets}
    for p in model.parameters():
        p.requires_grad_(id(p) in target_ids)
    fisher = {n: torch.zeros_like(m.weight, dtype=torch.float32, device="cpu") for n, m in targets} if diagonal else {}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    gsums: dict[str, torch.Tensor] = {}
    gcounts: dict[str, int] = {}
    shared_input: dict[tuple, str] = {}  # (data_ptr, shape) of an input seen in this chunk → first layer
    alias: dict[str, str] = {}

    def grad_hook(name: str):
        def fn(g: torch.Tensor) -> None:
            g = g.detach().reshape(-1, g.shape[-1]).to(torch.float64)
            if name not in gsums:
                gsums[name] = torch.zeros(g.shape[1], dtype=torch.float64, device=g.device)
                gcounts[name] = 0
            gsums[name] += g.pow(2).sum(0)
            gcounts[name] += g.shape[0]
        return fn

    def hook(name: str):
        def fn(_module: nn.Module, args: tuple, output: Any) -> None:
            if output_grads and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(grad_hook(name))
            if not hessians:
                return
            inp = args[0]
            # q/k/v (and gate/up) read the same input tensor: one Gram, shared (memory ÷ 2-3)
            key = (inp.data_ptr(), tuple(inp.shape))
            first = shared_input.setdefault(key, name)
            if first != name:
                alias[name] = first
                return
            # fp32 Gram per chunk (float64 matmuls cost 2-4× more and dominate the pass on a CPU),
            # accumulated across chunks in float64
            x = inp.detach().reshape(-1, inp.shape[-1]).to(torch.float32)
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                counts[name] = 0
            sums[name] += (x.T @ x).to(torch.float64)
            counts[name] += x.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in targets] if hessians or output_grads else []
    was_training = model.training
    model.eval()
    chunks = 0
    try:
        for batch in batches:
            ids = torch.as_tensor(batch).to(device)
            if ids.dim() == 1:
                ids = ids[None]
            shared_input.clear()
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            for name, m in targets:
                g = m.weight.grad
                if g is None:
                    raise ValueError(f"quant.error=fisher: no gradient reached layer {name!r}")
                if not bool(torch.isfinite(g).all()):
                    raise ValueError(f"quant.error=fisher: non-finite gradient in layer {name!r} "
                                     f"(chunk {chunks}); check the model and the calibration text")
                if diagonal:
                    fisher[name] += g.detach().float().pow(2).cpu()
                m.weight.grad = None
            chunks += 1
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
            p.grad = None
        model.train(was_training)
    if not chunks:
        raise ValueError("quant.error=fisher needs calibration batches; got none")
    for f in fisher.values():
        f /= chunks
    hess: dict[str, torch.Tensor] = {}
    if hessians:
        for n in sums:
            sums[n] /= max(counts[n], 1)
        hess = {n: sums[alias.get(n, n)] for n, _ in targets}
    if output_grads:
        return fisher, hess, {n: (gsums[n] / max(gcounts[n], 1)).cpu() for n, _ in targets}
    return fisher, hess
