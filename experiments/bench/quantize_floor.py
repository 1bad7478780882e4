"""The work floor of ``quantize_model``'s sub-stages: their dense-GEMM work at the machine's GEMM rate.

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
* **codebooks + error tables**: the K-FAC row costs, ``Δ H`` per candidate width (``K·out·in²``);
  the Lloyd-Max codebook fit (sorts, prefix sums, binary searches: not GEMM work) is timed once per
  distinct layer shape on a real weight of that shape (``lloyd_s``) and counted per layer.
* **quantize + init**: per init iteration and layer the whitened residual ``R·S`` and the
  activation-norm error ``D·H`` (``2·out·in²``), per layer the Cholesky factor of ``H`` (``in³/3``);
  the rank-r factorization (:func:`lowra.adapter_init.low_rank_factors`: a float64 Gram and
  LAPACK's partial eigensolver) is timed once per distinct shape (``svd_s``) and counted per layer
  and iteration (``factors_s``).

``floor_s`` = GEMM time + the timed components. Everything else (element-wise work, re-quantization,
Python, I/O, the machine's load) is what a measured time adds above its floor.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import torch
from torch import nn

FLOP_PER_MAC = 2


def best_time(fn: Any, repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``fn()``, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_rate(threads: int, m: int = 1024, k: int = 576, n: int = 1536, repeats: int = 8) -> float:
    """Measured fp32 GEMM rate in FLOP/s (``[m, k] @ [k, n]``, best of ``repeats``, after a warm-up)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(m, k), torch.randn(k, n)
    return FLOP_PER_MAC * m * k * n / best_time(lambda: torch.mm(a, b), repeats)


def svd_seconds(shape: tuple[int, int], rank: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` time of the init's rank-``rank`` factorization of an fp32 ``[out, in]`` residual."""
    from lowra.adapter_init import low_rank_factors

    x = torch.randn(*shape)
    return best_time(lambda: low_rank_factors(x, rank, 1.0), repeats)


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


def codebook_seconds(weight: torch.Tensor, candidates: tuple[int, ...], iters: int, group_size: int) -> float:
    """Time of ``learn_codebooks`` of one real weight at every candidate width (after a small warm-up)."""
    from lowra.codebook import learn_codebooks

    learn_codebooks(weight[:8], bits=candidates, group_size=group_size, iters=iters)
    t0 = time.perf_counter()
    learn_codebooks(weight, bits=candidates, group_size=group_size, iters=iters)
    return time.perf_counter() - t0


def floor(model: nn.Module, targets: list[str], calibration: torch.Tensor, candidates: tuple[int, ...],
          threads: int, rank: int = 8, codebook_iters: int = 20, group_size: int = 64) -> dict[str, Any]:
    """The work model of each wrapped sub-stage: GEMM floor (seconds at the measured rate) plus, where a
    sub-stage is not GEMM work, its measured components (Lloyd-Max codebooks, the init's factorizations),
    timed once per distinct layer shape and counted per layer. The init is counted for one iteration:
    :func:`with_init_iters` scales it to the iterations the run made (known after the plan)."""
    shapes = [tuple(model.get_submodule(n).weight.shape) for n in targets]
    count = Counter(shapes)
    samples, seq = (int(s) for s in calibration.shape)
    tokens = samples * seq
    cfg = model.config
    d, vocab, layers = int(cfg.hidden_size), int(cfg.vocab_size), int(cfg.num_hidden_layers)
    p = sum(o * i for o, i in shapes)
    attention = layers * 2 * (seq // 2) * d * 2  # QKᵀ and PV, causal: S/2 keys on average
    grams = sum(i * i for i in distinct_inputs(model, targets, calibration[:1]))
    calib_macs = tokens * (3 * p + 4 * attention + grams + 2 * vocab * d)
    table_macs = len(candidates) * sum(o * i * i for o, i in shapes)
    # per iteration R·S and the activation-norm error D·H; per layer the Cholesky factor of H (in³/3)
    iter_macs = 2 * sum(o * i * i for o, i in shapes)
    cholesky_macs = sum(i ** 3 // 3 for _, i in shapes)
    rate = gemm_rate(threads)
    svd = {s: svd_seconds(s, rank) for s in count}
    first = {}
    for name, shape in zip(targets, shapes):
        first.setdefault(shape, model.get_submodule(name).weight.detach())
    lloyd = {s: codebook_seconds(w, candidates, codebook_iters, group_size) for s, w in first.items()}
    svd_total = sum(svd[s] * c for s, c in count.items())
    lloyd_total = sum(lloyd[s] * c for s, c in count.items())
    macs = {"calibrate": calib_macs, "codebooks + error tables": table_macs,
            "quantize + init": iter_macs + cholesky_macs}
    out = {name: {"gflop": round(FLOP_PER_MAC * m / 1e9, 1), "gemm_s": round(FLOP_PER_MAC * m / rate, 2)}
           for name, m in macs.items()}
    out["codebooks + error tables"]["lloyd_s"] = round(lloyd_total, 2)
    out["quantize + init"]["factors_s"] = round(svd_total, 2)
    for v in out.values():
        v["floor_s"] = round(v["gemm_s"] + v.get("lloyd_s", 0.0) + v.get("factors_s", 0.0), 2)
    out["quantize + init"]["per_iter_gemm_s"] = round(FLOP_PER_MAC * iter_macs / rate, 4)
    return {"gemm_gflops": round(rate / 1e9, 1), "calibration_tokens": tokens, "threads": threads,
            "init_iters": 1, "stages": out,
            "factors_s_per_shape": {f"{o}x{i}": round(t, 4) for (o, i), t in svd.items()},
            "lloyd_s_per_shape": {f"{o}x{i}": round(t, 4) for (o, i), t in lloyd.items()}}


def with_init_iters(result: dict[str, Any], iters: int) -> dict[str, Any]:
    """``floor``'s result with the init counted for ``iters`` iterations (Cholesky factors once per layer)."""
    init = result["stages"]["quantize + init"]
    extra = max(iters, 1) - 1
    gemm_s = init["gemm_s"] + extra * init["per_iter_gemm_s"]
    init["gflop"] = round(init["gflop"] * gemm_s / max(init["gemm_s"], 1e-12), 1)
    init["gemm_s"] = round(gemm_s, 2)
    init["factors_s"] = round(init["factors_s"] * max(iters, 1), 2)
    init["floor_s"] = round(init["gemm_s"] + init["factors_s"], 2)
    result["init_iters"] = iters
    return result
