"""Host time of one ``LowRALinear`` call: the Python a user pays per layer, with the kernels stubbed out.

Every call runs the whole Python path of a quantized LoRA linear — module call, the
``torch.ops.lowra.lut_linear`` op (or, in eager inference, its implementation called directly),
backend choice, cached per-layer arguments, output allocation, the extension calls — while the C++
extension's kernels are no-ops (``lowra_kernels.cpu_backend.stubbed_launches``). The layer is tiny
(``--features``, default 16 × 16, rank 4), so the ATen work left (adapter and bias ops where they run
outside the extension, BLAS of the dequantized weight at M = 2048) costs about what its dispatch
costs, as it would on a GPU where it is launched asynchronously. Beside it, the same call shapes
through ``F.linear`` and ``F.linear`` + LoRA (``F.linear(x, W, b) + s · F.linear(F.linear(x, A), B)``)
on a dense weight. Modes: ``eager`` (under ``torch.no_grad``: inference/decode), ``eager+grad``
(forward only, recording autograd: a training step's forward) and ``compiled`` (``torch.compile``,
inductor, ``dynamic=False``, under ``torch.no_grad``).

Candidates run in interleaved rounds (one thread), so load from other processes hits them alike;
the table reports the median µs per call over rounds, and the ratio to ``F.linear`` + LoRA.

    .venv/bin/python -m experiments.bench.host [--ms 1 16 2048] [--plans 1 2 4 mixed] [--no-compile]

Writes ``results/bench/host_cpu.json``. Targets (issue 27): eager ≤ 15 µs per call and ≤ 1.5×
``F.linear`` + LoRA's host time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[2]
PLANS = {"1": (1,), "2": (2,), "4": (4,), "mixed": (1, 2, 4)}


class DenseLoRA(nn.Module):
    """``F.linear(x, W, b)`` (+ ``s · F.linear(F.linear(x, A), B)`` when ``rank``): the baseline call."""

    def __init__(self, out_features: int, in_features: int, rank: int, scaling: float = 2.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(out_features), requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(rank, in_features)) if rank else None
        self.lora_B = nn.Parameter(torch.randn(out_features, rank)) if rank else None
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.lora_A is not None:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        return y


def lowra_layer(out_features: int, in_features: int, widths: tuple[int, ...], rank: int, seed: int = 0) -> nn.Module:
    """A ``LowRALinear`` with rows spread over ``widths`` (random codes, NF codebooks, group 64), a bias
    and rank-``rank`` adapters (B non-zero)."""
    from experiments.bench.decode import random_group
    from lowra.format import QuantizedTensor
    from lowra.linear import LowRALinear
    from lowra.scales import GroupScales, compute_absmax

    gen = torch.Generator().manual_seed(seed)
    per_row = torch.tensor(widths)[torch.arange(out_features) % len(widths)]
    groups = [random_group(b, (per_row == b).nonzero().flatten().to(torch.int32), in_features, gen) for b in widths]
    w = torch.randn(out_features, in_features, generator=gen)
    qt = QuantizedTensor((out_features, in_features), 64, groups, GroupScales.store(compute_absmax(w, 64)))
    layer = LowRALinear(qt, bias=torch.randn(out_features, generator=gen), rank=rank, alpha=2.0 * rank)
    if rank:
        nn.init.normal_(layer.lora_B)
    return layer


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    """Mean µs of one ``fn()`` over ``calls`` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def candidates(layer: nn.Module, dense: nn.Module, plain: nn.Module, x: torch.Tensor,
               compiled: dict[str, nn.Module]) -> dict[str, Callable[[], object]]:
    """name → a zero-argument call (grad mode set inside)."""
    xg = x.clone().requires_grad_(True)

    def no_grad(module: nn.Module, t: torch.Tensor) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                return module(t)
        return call

    out = {"lowra eager": no_grad(layer, x), "F.linear+LoRA eager": no_grad(dense, x),
           "F.linear eager": no_grad(plain, x), "lowra eager+grad": lambda: layer(xg),
           "F.linear+LoRA eager+grad": lambda: dense(xg)}
    for name, module in compiled.items():
        out[f"{name} compiled"] = no_grad(module, x)
    return out


def measure(cands: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    """Median over ``rounds`` interleaved rounds of each candidate's µs per call (after a warm-up)."""
    for fn in cands.values():
        per_call_us(fn, max(10, calls // 10))
    samples: dict[str, list[float]] = {name: [] for name in cands}
    for _ in range(rounds):
        for name, fn in cands.items():
            samples[name].append(per_call_us(fn, calls))
    return {name: statistics.median(v) for name, v in samples.items()}


def run_case(plan: str, m: int, args: argparse.Namespace) -> dict:
    """One (plan, M) row: every candidate's median µs per call."""
    from lowra_kernels.cpu_backend import stubbed_launches

    torch.manual_seed(0)
    n = args.features
    layer = lowra_layer(n, n, PLANS[plan], args.rank)
    dense, plain = DenseLoRA(n, n, args.rank), DenseLoRA(n, n, 0)
    x = torch.randn(m, n)
    compiled = {}
    if not args.no_compile:
        torch._dynamo.reset()
        compiled = {name: torch.compile(mod, dynamic=False, fullgraph=True)
                    for name, mod in (("lowra", layer), ("F.linear+LoRA", dense))}
        with torch.no_grad():
            for mod in compiled.values():
                mod(x)  # compile outside the timed region (with the real extension)
    with stubbed_launches():
        us = measure(candidates(layer, dense, plain, x, compiled), args.rounds, args.calls)
    base = us["F.linear+LoRA eager"]
    return {"plan": plan, "m": m, "us_per_call": us, "ratio_eager_to_linear_lora": us["lowra eager"] / base,
            "ratio_grad_to_linear_lora_grad": us["lowra eager+grad"] / us["F.linear+LoRA eager+grad"]}


def print_row(row: dict) -> None:
    us = row["us_per_call"]
    cells = "  ".join(f"{name} {v:7.1f}" for name, v in us.items())
    print(f"{row['plan']:>5} M={row['m']:<5} {cells}  ×{row['ratio_eager_to_linear_lora']:.2f}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 16, 2048])
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled candidates")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "host_cpu.json")
    args = parser.parse_args(argv)
    from lowra.atomic import write_text_atomic
    from lowra_kernels.cpu_backend import available

    if not available():
        raise SystemExit("the CPU extension did not build: nothing to stub")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    try:
        rows = []
        for plan in args.plans:
            for m in args.ms:
                rows.append(run_case(plan, m, args))
                print_row(rows[-1])
    finally:
        torch.set_num_threads(threads)
    result = {"device": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "threads": 1, "features": args.features, "rank": args.rank,
              "rounds": args.rounds, "calls_per_round": args.calls,
              "load_average_before_after": [load_before[0], os.getloadavg()[0]],
              "stubbed": "lowra_kernels.cpu_backend.stubbed_launches (extension kernels are no-ops)", "rows": rows}
    write_text_atomic(args.out, json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
