"""A quantized model under ``torch.compile(fullgraph=True)`` on CPU: no graph break, eager's numbers.

For each model (``stories260K``, ``smollm2_135m``: every decoder linear a ``LowRALinear`` at 2 bits with
rank-8 adapters, ``experiments.bench.decode.quantize_decoder``), with inductor:

* forward (no grad, batch 1 × 64 tokens): compiled vs eager max |Δlogits| and time per call;
* training step (``loss.backward`` + AdamW on the adapters, batch 2 × 64): ``--steps`` steps from the same
  start, eager and compiled, the largest relative loss difference and the median step time (compile
  excluded: the first step is timed apart).

``fullgraph=True`` raises on any graph break, so a finished run is the no-graph-break check.
Eager and compiled steps alternate (one of each per step), so machine load hits both alike.

    .venv/bin/python -m experiments.bench.compile [--models stories260K smollm2_135m] [--steps 20]

Writes ``results/bench/compile_cpu.json``. Targets (issue 27): compiled step ≤ eager step time, losses
equal within 1e-5 relative over 20 steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def quantized_model(name: str, bits: float, rank: int) -> torch.nn.Module:
    """The model with every decoder linear quantized (random codes, NF codebooks) and non-zero adapters."""
    from experiments.bench.decode import build_model, quantize_decoder
    from lowra.linear import LowRALinear

    torch.manual_seed(0)
    model = quantize_decoder(build_model(name), bits, rank, "auto")
    for m in model.modules():
        if isinstance(m, LowRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.01)
    return model


def timed(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def forward_check(model: torch.nn.Module, ids: torch.Tensor, reps: int) -> dict:
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        want = model(ids).logits
        got, compile_s = timed(lambda: compiled(ids).logits)
        eager_s, comp_s = [], []
        for _ in range(reps):
            eager_s.append(timed(lambda: model(ids))[1])
            comp_s.append(timed(lambda: compiled(ids))[1])
    return {"max_abs_diff_logits": (got - want).abs().max().item(), "logit_scale": want.abs().max().item(),
            "first_call_s": compile_s, "eager_ms": statistics.median(eager_s) * 1e3,
            "compiled_ms": statistics.median(comp_s) * 1e3}


def train_check(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> dict:
    from lowra.model_layers import lora_parameters

    runs = {}
    for mode in ("eager", "compiled"):
        m = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(lora_parameters(m), lr=1e-3)
        runs[mode] = (torch.compile(m, fullgraph=True) if mode == "compiled" else m, opt)

    def step(mode: str) -> float:
        run, opt = runs[mode]
        loss = run(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(steps):
        for mode in ("eager", "compiled"):
            loss, sec = timed(lambda mode=mode: step(mode))
            losses[mode].append(loss)
            times[mode].append(sec)
    rel = max(abs(a - b) / abs(a) for a, b in zip(losses["eager"], losses["compiled"]))
    return {"steps": steps, "losses_eager": losses["eager"], "losses_compiled": losses["compiled"],
            "max_rel_loss_diff": rel, "first_step_s": {k: v[0] for k, v in times.items()},
            "step_ms": {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()},
            "compiled_over_eager": statistics.median(times["compiled"][1:]) / statistics.median(times["eager"][1:])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["stories260K", "smollm2_135m"],
                        choices=["stories260K", "smollm2_135m", "synthetic-smollm2"])
    parser.add_argument("--bits", type=float, default=2.0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "compile_cpu.json")
    args = parser.parse_args(argv)
    from lowra.atomic import write_text_atomic

    result = {"device": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "bits": args.bits, "rank": args.rank,
              "load_average_before": os.getloadavg()[0], "models": {}}
    for name in args.models:
        model = quantized_model(name, args.bits, args.rank).eval()
        gen = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        torch._dynamo.reset()
        fwd = forward_check(model, torch.randint(0, vocab, (1, 64), generator=gen), args.reps)
        torch._dynamo.reset()
        train = train_check(model, torch.randint(0, vocab, (2, 64), generator=gen), args.steps)
        result["models"][name] = {"forward": fwd, "train": train}
        print(f"{name}: forward max|Δ| {fwd['max_abs_diff_logits']:.2e} (scale {fwd['logit_scale']:.1f}), "
              f"{fwd['eager_ms']:.1f} → {fwd['compiled_ms']:.1f} ms; train step {train['step_ms']['eager']:.1f} → "
              f"{train['step_ms']['compiled']:.1f} ms (×{train['compiled_over_eager']:.2f}), max rel loss diff "
              f"{train['max_rel_loss_diff']:.2e} over {args.steps} steps", flush=True)
        result["load_average_after"] = os.getloadavg()[0]
        write_text_atomic(args.out, json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
