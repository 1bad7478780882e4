"""CPU training-step time: LowRA-quantized stories260K vs the same model in fp32 with plain LoRA.

One step = forward + backward + AdamW update of the adapters, batch ``B × T`` tokens. Configs:

* ``fp32 + PEFT LoRA``: the reference (Hugging Face PEFT ``LoraConfig`` on the fp32 model);
* ``fp32 + LowRALinear (method=none)``: plain LoRA through our module (dense frozen base);
* ``LowRA <bits>``: quantized base (per-row codebooks + plan), dequantized on the fly in forward
  and again in backward (CPU reference kernels);
* ``NF4``: the NormalFloat quantizer through the same module.

Configs are timed in interleaved rounds (each round runs every config for ``--steps`` steps) so
that load from other processes hits all of them alike; the table reports the median step time over
rounds and its ratio to PEFT LoRA. Target (issue 5): LowRA ≤ 1.5× fp32 plain LoRA.

    .venv/bin/python -m experiments.bench.train_step [--batch 8 --seq 256 --rank 2 --rounds 5]

Writes ``results/bench/train_step_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from experiments.eval.stories import REPO, load_model


def _peft_model(rank: int, alpha: float):
    from peft import LoraConfig, get_peft_model

    model = load_model()
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    return model, [p for p in model.parameters() if p.requires_grad]


def _ours(method: str, bits: float, rank: int, alpha: float):
    from lowra.model_layers import lora_parameters
    from lowra.model_quantization import quantize_model

    model = load_model()
    quantize_model(model, bits, method=method, rank=rank, alpha=alpha, loftq_iters=1, progress=False,
                   plan_options={"clusters": 16, "samples": 0, "max_nodes": 200}, codebook_iters=10)
    return model, lora_parameters(model)


def _run_steps(model, params, batch: torch.Tensor, steps: int, opt) -> float:
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--steps", type=int, default=5, help="steps per config per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bits", type=float, nargs="+", default=[1.15, 2.0, 4.0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 = stable timings on a shared 2-core machine)")
    parser.add_argument("--out", default=str(REPO / "results" / "bench" / "train_step_cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    configs = {"fp32 + PEFT LoRA": _peft_model(args.rank, args.alpha),
               "fp32 + LowRALinear (none)": _ours("none", 16, args.rank, args.alpha)}
    for bits in args.bits:
        configs[f"LowRA {bits:g}-bit"] = _ours("lowra", bits, args.rank, args.alpha)
    configs["NF4 (same module)"] = _ours("nf", 4, args.rank, args.alpha)
    batch = torch.randint(3, 512, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    optims = {k: torch.optim.AdamW(p, lr=1e-4) for k, (_, p) in configs.items()}
    for name, (model, params) in configs.items():  # warm-up
        _run_steps(model, params, batch, 2, optims[name])
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.rounds):
        for name, (model, params) in configs.items():
            times[name].append(_run_steps(model, params, batch, args.steps, optims[name]))
    ref = statistics.median(times["fp32 + PEFT LoRA"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"config": name, "median_step_s": med, "min_step_s": min(ts), "ratio_vs_peft_lora": med / ref,
                     "rounds_s": ts, "trainable_params": sum(p.numel() for p in configs[name][1])})
    result = {
        "model": "stories260K", "device": "cpu", "batch": args.batch, "seq": args.seq, "rank": args.rank,
        "alpha": args.alpha, "steps_per_round": args.steps, "rounds": args.rounds,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "target": "LowRA step <= 1.5 x fp32 plain LoRA", "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"train step on CPU, stories260K, batch {args.batch}x{args.seq}, rank {args.rank}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'config':<28} {'median ms':>10} {'min ms':>8} {'× PEFT LoRA':>12}")
    for r in rows:
        print(f"{r['config']:<28} {r['median_step_s'] * 1e3:>10.1f} {r['min_step_s'] * 1e3:>8.1f} "
              f"{r['ratio_vs_peft_lora']:>12.2f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
