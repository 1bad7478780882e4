"""Step time and peak memory of the training options of issue 31, side by side on stories260K.

Variants (``--variants``): ``base`` (the adapters only, the runner's default loss), ``distill``
(``train.distill.weight=0.5``, the fp teacher loaded beside the student), ``codebooks``
(``train.codebooks=trainable``) and ``codebooks_scales`` (``train.scales=trainable`` too; their
learning rates ``train.codebook_lr`` / ``train.scale_lr``, no decay). Each is one optimizer
step of the runner's recipe (batch 4 × 256 tokens, AdamW) on stories260K quantized at ``--bits``.

Time: the variants run interleaved in one process (``--rounds`` rounds of ``--steps`` steps each,
after one warm-up step), so a shared machine's load hits them alike; the median step of each is
reported with its ratio to ``base``. Memory: each variant runs again in a fresh child process
(``--child``), which reports its resident-set peak during 3 steps minus its resident set before the
model was built, and its peak during 3 steps above the built state (``/proc/self/status`` VmHWM,
reset after the build where the kernel allows). Writes
``results/bench/beyond_cpu.json`` and prints a table.

    .venv/bin/python -m experiments.bench.beyond --bits 1.15
    .venv/bin/python -m experiments.bench.beyond --bits 1.15 --variants base codebooks codebooks_scales \
        --out results/bench/trainable_tables_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
VARIANTS = ("base", "distill", "codebooks", "codebooks_scales")


def build(bits: float, variant: str) -> tuple[Callable[[int], float], dict[str, Any]]:
    """A ``step(index) -> loss`` closure for ``variant`` and what it holds."""
    from omegaconf import OmegaConf

    from experiments.eval.stories import load_model, token_splits
    from experiments.runner.config_check import CONF_DIR
    from experiments.runner.data import pack_blocks
    from experiments.runner.distill import distill_loss, freeze
    from experiments.runner.setup import train_base_tables, trainable_parameters
    from experiments.runner.train import LMBatches, param_groups
    from lowra.model_quantization import quantize_model

    torch.manual_seed(0)
    model = load_model()
    quantize_model(model, bits, rank=2, alpha=4, plan_options={"clusters": 16, "samples": 0, "max_nodes": 200},
                   progress=False)
    tcfg = OmegaConf.load(CONF_DIR / "train" / "default.yaml")
    tcfg.codebooks = "trainable" if variant.startswith("codebooks") else "frozen"
    tcfg.scales = "trainable" if variant == "codebooks_scales" else "frozen"
    lrs, no_decay = train_base_tables(model, tcfg)
    named = trainable_parameters(model)
    params = list(named.values())
    opt = torch.optim.AdamW(param_groups(params, [lrs.get(n, float(tcfg.lr)) for n in named], float(tcfg.lr),
                                         [n in no_decay for n in named]), lr=float(tcfg.lr))
    batches = LMBatches(pack_blocks(token_splits()[0], 256), 4, 0)
    teacher = freeze(load_model()) if variant == "distill" else None
    model.train()

    def step(i: int) -> float:
        batch = batches.get(i)
        if teacher is not None:
            loss, _ = distill_loss(model, teacher, batch, 0.5, 1.0, int(tcfg.distill.chunk_tokens))
        else:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    info = {"trainable_params": sum(p.numel() for p in params),
            "teacher_param_bytes": 0 if teacher is None else sum(p.numel() * 4 for p in teacher.parameters())}
    return step, info


def child(bits: float, variant: str) -> dict[str, Any]:
    """RSS growth of building the student (+ teacher), and the peak over 3 steps above the built state
    (run in a fresh process; the peak is reset after the build, so quantization's own peak is out)."""
    from lowra.streaming.peak_memory import current_rss, peak_rss, reset_peak_rss

    torch.set_num_threads(1)
    before = current_rss()
    step, info = build(bits, variant)
    built = current_rss()
    resettable = reset_peak_rss()
    for i in range(3):
        step(i)
    peak = peak_rss()
    return {"variant": variant, "build_rss_bytes": built - before, "train_peak_over_built_bytes": peak - built,
            "train_peak_over_start_bytes": peak - before, "peak_resettable": resettable, **info}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=float, default=1.15)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", choices=VARIANTS)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "beyond_cpu.json")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.bits, args.child)))
        return
    torch.set_num_threads(1)
    steps = {v: build(args.bits, v)[0] for v in args.variants}
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for v in args.variants:
        steps[v](0)  # warm-up
    for r in range(args.rounds):
        for v in args.variants:
            for s in range(args.steps):
                t0 = time.perf_counter()
                steps[v](1 + r * args.steps + s)
                times[v].append(time.perf_counter() - t0)
    memory = {}
    for v in args.variants:
        out = subprocess.run([sys.executable, "-m", "experiments.bench.beyond", "--bits", str(args.bits),
                              "--child", v], cwd=REPO, capture_output=True, text=True, check=True).stdout
        memory[v] = json.loads(out.strip().splitlines()[-1])
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    base = statistics.median(times[args.variants[0]])
    peak0 = memory[args.variants[0]]["train_peak_over_start_bytes"]
    rows = [{"variant": v, "median_step_s": statistics.median(times[v]),
             "ratio_vs_first": statistics.median(times[v]) / base, "steps": len(times[v]), **memory[v],
             "peak_ratio_vs_first": memory[v]["train_peak_over_start_bytes"] / peak0}
            for v in args.variants]
    from experiments.runner.logging_utils import atomic_write_json

    atomic_write_json(args.out, {"bits": args.bits, "threads": 1, "loadavg_after": load, "rows": rows,
                                 "machine": "shared 2-core CPU"})
    print(f"stories260K at {args.bits} bits, 1 thread, load {load}")
    print("| variant | median step s | × first | build RSS MB | training peak over built MB | peak over start MB "
          "| peak × first |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['median_step_s']:.3f} | {r['ratio_vs_first']:.2f} | "
              f"{r['build_rss_bytes'] / 2**20:.1f} | {r['train_peak_over_built_bytes'] / 2**20:.1f} | "
              f"{r['train_peak_over_start_bytes'] / 2**20:.1f} | {r['peak_ratio_vs_first']:.3f} |")


if __name__ == "__main__":
    main()
