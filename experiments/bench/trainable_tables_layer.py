"""Step time of one quantized layer with trainable codebooks / scales against the frozen layer (issue 31).

One ``LowRALinear`` per shape (``--shapes``, ``out×in``; default: the seven projections of a
SmolLM2-135M block, and stories260K's three) holding a random weight quantized with learned 1/2-bit
codebooks (a fraction ``--bits − 1`` of the rows, at random, at 2 bits, the rest at 1 bit: the mix the
plan gives at 1.15 / 1.5 / 2 bits), group size 64, fp16 absmax, rank 2 adapters (alpha 4). A step is
the runner's: forward on ``--tokens`` tokens (4 × 256), backward of ``sum(y)``, AdamW over the layer's
trainable parameters. The three variants (``frozen``, ``codebooks``: ``train_base_tables(codebooks=True)``,
``scales``: codebooks and absmax) of one shape run interleaved, ``--rounds`` rounds of ``--steps``
steps after a warm-up, on one thread; the median wall time and the median thread CPU time
(``time.thread_time``: what a loaded machine does not inflate) of each are reported with their
ratio to ``frozen``. Memory: the bytes the step saves for the backward (unique storages, counted by
``torch.autograd.graph.saved_tensors_hooks``) — the activation memory the variants differ by — and the
trainable-table parameters with their AdamW state.

    .venv/bin/python -m experiments.bench.trainable_tables_layer --bits 1.15 \\
        --out results/bench/trainable_tables_layer_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
SMOLLM2 = ["576x576", "192x576", "192x576", "576x576", "1536x576", "1536x576", "576x1536"]
STORIES = ["64x64", "172x64", "64x172"]
VARIANTS = ("frozen", "codebooks", "scales")


def build_layer(out_f: int, in_f: int, bits: float, variant: str, seed: int = 0) -> tuple[Any, list]:
    """The layer of ``variant`` and its trainable parameters (the same weight, plan and adapters for all)."""
    from lowra.codebook import learn_codebooks
    from lowra.format import QuantizedTensor
    from lowra.linear import LowRALinear

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    cb = learn_codebooks(w, bits=(1, 2), group_size=64, iters=5)
    row_bits = (torch.rand(out_f, generator=gen) < bits - 1).long() + 1
    qt = QuantizedTensor.from_codebooks(w, row_bits, cb.codebooks, group_size=64, double_quant=False)
    torch.manual_seed(seed)
    m = LowRALinear(qt, rank=2, alpha=4.0)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.01)
    new = m.train_base_tables(codebooks=variant != "frozen", scales=variant == "scales")
    return m, [m.lora_A, m.lora_B, *new]


def saved_bytes(step, held: torch.nn.Module | None = None) -> int:
    """Bytes of the unique storages autograd saves for the backward during ``step()``, less the storages
    ``held`` owns anyway (its parameters, buffers and packed base: saving them costs nothing, and whether
    a path saves them or keeps them as attributes is an implementation detail)."""
    owned: set[int] = set()
    if held is not None:
        tensors = [*held.parameters(), *held.buffers()]
        op_weight = getattr(held, "_op_weight", None)
        if op_weight is not None:
            tensors += list(op_weight[0])
        owned = {t.untyped_storage().data_ptr() for t in tensors}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in owned:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def bench_shape(shape: str, bits: float, tokens: int, rounds: int, steps: int) -> list[dict[str, Any]]:
    out_f, in_f = (int(v) for v in shape.split("x"))
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(1))
    runs = {}
    for v in VARIANTS:
        m, params = build_layer(out_f, in_f, bits, v)
        opt = torch.optim.AdamW(params, lr=1e-3)

        def step(m=m, opt=opt) -> None:
            y = m(x.clone().requires_grad_(True))
            y.sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up (and AdamW's state)
        runs[v] = (step, m, params, opt)
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for v in VARIANTS:
            for _ in range(steps):
                t0, c0 = time.perf_counter(), time.thread_time()
                runs[v][0]()
                wall[v].append(time.perf_counter() - t0)
                cpu[v].append(time.thread_time() - c0)
    rows = []
    for v in VARIANTS:
        step, m, params, opt = runs[v]
        tables = params[2:]
        state = sum(t.numel() * t.element_size() for p in tables for t in opt.state[p].values() if torch.is_tensor(t))
        rows.append({
            "shape": shape, "variant": v, "median_step_s": statistics.median(wall[v]),
            "median_step_cpu_s": statistics.median(cpu[v]),
            "ratio_vs_frozen": statistics.median(wall[v]) / statistics.median(wall["frozen"]),
            "cpu_ratio_vs_frozen": statistics.median(cpu[v]) / statistics.median(cpu["frozen"]),
            "saved_for_backward_bytes": saved_bytes(step, m),
            "table_param_bytes": sum(p.numel() * p.element_size() for p in tables), "table_adam_bytes": state,
            "steps": len(wall[v]), "rows_2bit": int(sum(g.rows.numel() for g in m.qweight.groups if g.bits == 2)),
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=float, default=1.15, help="1 to 2: the fraction bits − 1 of rows at 2 bits")
    ap.add_argument("--shapes", nargs="+", default=SMOLLM2 + STORIES)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "trainable_tables_layer_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    rows = [r for s in args.shapes for r in bench_shape(s, args.bits, args.tokens, args.rounds, args.steps)]
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    smol = [s for s in dict.fromkeys(args.shapes) if s in SMOLLM2]
    block = {}
    for v in VARIANTS:  # a SmolLM2 block: the seven projections' median steps summed
        pick = [r for r in rows if r["variant"] == v and r["shape"] in smol]
        counts = {s: SMOLLM2.count(s) for s in smol}
        block[v] = {k: sum(r[k] * counts[r["shape"]] for r in pick) for k in ("median_step_s", "median_step_cpu_s")}
    summary = {v: {"block_step_s": block[v]["median_step_s"], "block_step_cpu_s": block[v]["median_step_cpu_s"],
                   "ratio": block[v]["median_step_s"] / block["frozen"]["median_step_s"],
                   "cpu_ratio": block[v]["median_step_cpu_s"] / block["frozen"]["median_step_cpu_s"]}
               for v in VARIANTS} if smol else {}
    from experiments.runner.logging_utils import atomic_write_json

    atomic_write_json(args.out, {"bits": args.bits, "tokens": args.tokens, "threads": 1, "rows": rows,
                                 "smollm2_block": summary, "loadavg_before": load_before,
                                 "loadavg_after": load_after, "machine": "shared 2-core CPU"})
    print(f"{args.bits} bits, {args.tokens} tokens, 1 thread, load {load_before} → {load_after}")
    print("| shape | variant | median step ms | × frozen | median CPU ms | × frozen | saved for backward KB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['variant']} | {r['median_step_s'] * 1e3:.2f} | {r['ratio_vs_frozen']:.3f} | "
              f"{r['median_step_cpu_s'] * 1e3:.2f} | {r['cpu_ratio_vs_frozen']:.3f} | "
              f"{r['saved_for_backward_bytes'] / 1024:.0f} |")
    for v, s in summary.items():
        print(f"SmolLM2 block ({v}): {s['block_step_s'] * 1e3:.1f} ms ×{s['ratio']:.3f}, CPU "
              f"{s['block_step_cpu_s'] * 1e3:.1f} ms ×{s['cpu_ratio']:.3f}")


if __name__ == "__main__":
    main()
