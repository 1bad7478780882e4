"""Calibration data for quantizers that need it (OPTQ, ModuLoRA's ``quant=modulora``).

``calibration_windows`` draws a few hundred random token windows from the training stream (GPTQ
uses 128 random 2048-token segments of C4; we draw from the fine-tuning data itself).
``collect_hessians`` runs them through the full-precision model with forward hooks on the target
linears and returns each layer's input Hessian ``H = XᵀX / n`` ``[in, in]`` in float64 (``n``: the
number of token positions seen, padding excluded), ready for ``optq_quantize(..., hessian=H)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["calibration_windows", "collect_hessians"]


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


def _target_linears(model: nn.Module, target_modules: Any) -> list[tuple[str, nn.Linear]]:
    from lowra.model import find_target_linears

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
        target_modules: as ``lowra.model.find_target_linears`` (None: the model type's defaults).
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
