"""A/B of the init's rank-r factorization: the full fp32 SVD it used before vs ``low_rank_factors`` now.

    OMP_NUM_THREADS=1 python -m experiments.bench.init_factors [--model DIR] [--block 3] [--rank 8]

The 7 linears of one decoder block of SmolLM2-135M (default), each with a 2-bit-like residual
``W − round(W/a)·a`` (``a`` = row absmax / 1.5, codes in [-2, 1]); both variants run interleaved in
one process (``--rounds``, order alternating), best round reported, beside the relative distance of
each variant's ``s·B A`` to the float64 SVD's best rank-r fit. Prints a table and writes
``results/bench/init_factors_cpu.json`` (``--json``); the machine's load is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SMOLLM2 = Path(os.environ.get("LOWRA_CACHE", Path.home() / ".cache" / "lowra")) / "models" / "SmolLM2-135M-Instruct"


def svd_factors(residual: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous implementation: a full fp32 SVD, truncated."""
    U, S, Vh = torch.linalg.svd(residual.to(torch.float32), full_matrices=False)
    root = S[:rank].sqrt() / (scaling ** 0.5)
    return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]


def residuals(model_dir: Path, block: int) -> list[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    for name, mod in model.model.layers[block].named_modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight.detach()
            a = w.abs().amax(1, keepdim=True) / 1.5
            out.append((name, w - (w / a).round().clamp(-2, 1) * a))
    return out


def main(argv: list[str] | None = None) -> dict:
    from lowra.adapter_init import low_rank_factors

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=SMOLLM2)
    p.add_argument("--block", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=REPO / "results" / "bench" / "init_factors_cpu.json")
    args = p.parse_args(argv)
    res = residuals(args.model, args.block)
    variants = {"fp32 SVD (before)": svd_factors, "low_rank_factors (now)": low_rank_factors}
    times: dict[str, list[float]] = {k: [] for k in variants}
    load = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    for rnd in range(args.rounds):
        order = list(variants) if rnd % 2 == 0 else list(variants)[::-1]
        for name in order:
            t0 = time.perf_counter()
            for _, r in res:
                variants[name](r, args.rank, 2.0)
            times[name].append(time.perf_counter() - t0)
    error = dict.fromkeys(variants, 0.0)
    for _, r in res:
        U, S, Vh = torch.linalg.svd(r.double(), full_matrices=False)
        best = (U[:, :args.rank] * S[:args.rank]) @ Vh[:args.rank]
        for name, fn in variants.items():
            a, b = fn(r, args.rank, 2.0)
            error[name] = max(error[name], float((2.0 * (b @ a).double() - best).norm() / best.norm()))
    rows = {name: {"best_s": round(min(times[name]), 4), "rounds_s": [round(t, 4) for t in times[name]],
                   "max_rel_distance_to_fp64_svd": error[name]} for name in variants}
    before, now = (rows[k]["best_s"] for k in variants)
    rec = {"model": str(args.model), "block": args.block, "rank": args.rank, "layers": [n for n, _ in res],
           "threads": torch.get_num_threads(), "load_before": load,
           "load_after": [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]],
           "rows": rows, "speedup": round(before / now, 2)}
    print(f"{'variant':<24} {'best s':>8} {'max rel. distance to fp64 SVD':>30}")
    for name, row in rows.items():
        print(f"{name:<24} {row['best_s']:>8.3f} {row['max_rel_distance_to_fp64_svd']:>30.2e}")
    print(f"speedup {rec['speedup']}x ({rec['threads']} threads, load {load[0]:.2f})")
    from lowra.atomic import write_text_atomic

    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps(rec, indent=1) + "\n")
    return rec


if __name__ == "__main__":
    main()
