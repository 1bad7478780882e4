"""The compute floor of ``quantize_model``'s sub-stages: their dense-GEMM work at the machine's GEMM rate.

Used by :mod:`experiments.bench.quantize_stages` to say how far each measured sub-stage is from what
its matrix products alone must cost on the same machine, in the same process, at the same threads.
Multiply-accumulates (MACs) per sub-stage, from the model's target linears and the calibration size
(``T`` tokens, windows of ``S``), for the default ``quant=lowra`` (K-FAC table + calibrated init):

* **calibrate** (gradient statistics, :mod:`lowra.blockwise`): the forward sweep, the recomputed
  forward and the input-gradient backward of every block (``3·P`` per token, ``P = Σ out·in`` of
  the targets; weights are frozen, so no weight gradients), causal attention (``S/2`` keys on
  average: ``2·(S/2)·d`` MACs forward per layer and token, counted 4× for forward, recompute and a
  2× backward), one fp32 Gram ``in²`` per distinct layer input, and the LM head's logits and input
  gradient (``2·V·d``).
* **codebooks + error tables**: the K-FAC row costs, ``Δ H`` per candidate width (``K·out·in²``).
  The Lloyd-Max codebook fit itself (sorts, prefix sums, binary searches) is not GEMM work and has
  no floor here.
* **quantize + init**: per init iteration and layer the whitened residual ``R·S`` (``out·in²``);
  the rank-r factorization (:func:`lowra.adapter_init.low_rank_factors`: a float64 Gram and
  LAPACK's partial eigensolver) is timed once per distinct shape (``svd_s``) and counted per layer
  and iteration, beside the GEMM floor.

Everything else (element-wise work, Python, I/O) is what a measured time adds above its floor.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import torch
from torch import nn

FLOP_PER_MAC = 2


def gemm_rate(threads: int, m: int = 1024, k: int = 576, n: int = 1536, repeats: int = 8) -> float:
    """Measured fp32 GEMM rate in FLOP/s (``[m, k] @ [k, n]``, best of ``repeats``, after a warm-up)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return FLOP_PER_MAC * m * k * n / best


def svd_seconds(shape: tuple[int, int], rank: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` time of the init's rank-``rank`` factorization of an fp32 ``[out, in]`` residual."""
    from lowra.adapter_init import low_rank_factors

    x = torch.randn(*shape)
    low_rank_factors(x, rank, 1.0)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        low_rank_factors(x, rank, 1.0)
        best = min(best, time.perf_counter() - t0)
    return best


def distinct_inputs(model: nn.Module, targets: list[str], window: torch.Tensor) -> list[int]:
    """``in_features`` of each distinct input tensor the targets read in one forward of ``window [1, S]``
    (layers reading the same tensor, e.g. q/k/v, share one Gram, as the calibration hooks do)."""
    seen: dict[int, torch.Tensor] = {}  # the tensors are held, so no id is reused during the forward
    handles = []
    for name in targets:
        def hook(_m: nn.Module, args: tuple, _out: Any) -> None:
            seen.setdefault(id(args[0]), args[0])
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=window)
    finally:
        for h in handles:
            h.remove()
    return [int(x.shape[-1]) for x in seen.values()]


def floor(model: nn.Module, targets: list[str], calibration: torch.Tensor, candidates: int, init_iters: int,
          threads: int, rank: int = 8) -> dict[str, Any]:
    """GEMM floor (seconds at the measured rate) of each wrapped sub-stage, with the counts behind it."""
    shapes = [tuple(model.get_submodule(n).weight.shape) for n in targets]
    samples, seq = (int(s) for s in calibration.shape)
    tokens = samples * seq
    cfg = model.config
    d, vocab, layers = int(cfg.hidden_size), int(cfg.vocab_size), int(cfg.num_hidden_layers)
    p = sum(o * i for o, i in shapes)
    attention = layers * 2 * (seq // 2) * d * 2  # QKᵀ and PV, causal: S/2 keys on average
    grams = sum(i * i for i in distinct_inputs(model, targets, calibration[:1]))
    calib_macs = tokens * (3 * p + 4 * attention + grams + 2 * vocab * d)
    table_macs = candidates * sum(o * i * i for o, i in shapes)
    init_macs = init_iters * sum(o * i * i for o, i in shapes)
    rate = gemm_rate(threads)
    svd = {s: svd_seconds(s, rank) for s in Counter(shapes)}
    svd_total = init_iters * sum(svd[s] * c for s, c in Counter(shapes).items())
    macs = {"calibrate": calib_macs, "codebooks + error tables": table_macs, "quantize + init": init_macs}
    out = {name: {"gflop": round(FLOP_PER_MAC * m / 1e9, 1), "floor_s": round(FLOP_PER_MAC * m / rate, 2)}
           for name, m in macs.items()}
    out["quantize + init"]["svd_s"] = round(svd_total, 2)
    return {"gemm_gflops": round(rate / 1e9, 1), "calibration_tokens": tokens, "threads": threads,
            "init_iters": init_iters, "stages": out,
            "svd_s_per_shape": {f"{o}x{i}": round(s, 4) for (o, i), s in svd.items()}}
