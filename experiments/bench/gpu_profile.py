"""Where the GPU time of the LUT kernels goes: kernel time vs launch overhead, and every dequantize config.

``experiments.bench.kernels`` times each call with CUDA events after an L2 flush: that is what a
caller sees, host-side launch overhead included when the launch takes longer than the GPU work.
This script separates the two, on one shape (default 4096×11008, bf16 activations) and bits 1–4:

* ``kernel_us``: the device time of the CUDA kernels one call launches (``torch.profiler``, summed
  per call, by kernel name);
* ``host_us``: host time per call when calls are issued back to back with no synchronisation (the
  launcher's Python + driver cost: the floor of a call outside CUDA graphs);
* ``graph_us``: time per call replaying the call captured ``--graph-calls`` times in a CUDA graph
  (no host overhead, warm L2 for what fits);
* for the dequantize kernel, every shipped config timed the same way (graph replay), so a poor
  autotune choice shows beside the kernel's best.

Calls: dequantize to a transient bf16 weight, the LUT matmul at M = 1 and 16 (GEMV), and the bf16
``F.linear`` baseline at M = 1 and 16. Needs torch + triton only.

    python -m experiments.bench.gpu_profile [--shape 4096x11008] [--bits 1 2 3 4] [--out results/bench/gpu_profile.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def random_qweight(out_features: int, in_features: int, bits: int, device: torch.device):
    """A ``QuantizedTensor`` of one width with random codes and per-row NF codebooks (real format)."""
    from experiments.bench.decode import random_group
    from lowra.format import QuantizedTensor
    from lowra.scales import GroupScales

    gen = torch.Generator().manual_seed(bits)
    group = random_group(bits, torch.arange(out_features, dtype=torch.int32), in_features, gen)
    absmax = torch.rand(out_features, in_features // 64, generator=gen) + 0.5
    qt = QuantizedTensor((out_features, in_features), 64, [group],
                         GroupScales.store(absmax))
    return qt.to(device)


def kernel_times(fn, calls: int = 20) -> dict[str, float]:
    """Device µs per call of each CUDA kernel ``fn`` launches (profiler; summed over ``calls`` calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    events = prof.events()
    device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    if device:
        for evt in device:
            per_kernel[evt.name[:80]] += evt.device_time_total / calls
    else:  # older profilers attach kernels to the CPU-side events
        for evt in events:
            for k in getattr(evt, "kernels", []):
                per_kernel[k.name[:80]] += k.duration / calls
    return dict(per_kernel)


def host_time(fn, calls: int = 200) -> float:
    """Host µs per call issued back to back (no synchronisation inside)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    return host * 1e6


def graph_time(fn, calls: int = 20, replays: int = 10) -> float | None:
    """Device µs per call from replaying ``calls`` captured calls (None where capture fails)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            g.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / (replays * calls)
    except Exception as exc:
        print(f"  graph capture failed: {type(exc).__name__}: {exc}"[:300], flush=True)
        return None


def measure(name: str, fn) -> dict:
    row = {"call": name, "kernels_us": kernel_times(fn), "host_us": host_time(fn), "graph_us": graph_time(fn)}
    row["kernel_us"] = sum(row["kernels_us"].values())
    g = row["graph_us"]
    print(f"{name:<28} kernel {row['kernel_us']:8.1f} us  host {row['host_us']:8.1f} us  graph "
          f"{'-' if g is None else f'{g:8.1f}'} us  {list(row['kernels_us'])[:3]}", flush=True)
    return row


def dequant_configs(qt, dtype: torch.dtype) -> list[dict]:
    """Every shipped dequantize config on this weight (graph replay of the bare kernel)."""
    from lowra_kernels import dequantize as dq

    g = qt.groups[0]
    absmax = qt.packed().absmax
    out = torch.empty(qt.shape, dtype=dtype, device=g.codes.device)
    rows = []
    for cfg in dq.DEQUANT_CONFIGS:
        meta = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

        def fn(meta=meta):
            dq._launch(dq._dequantize_kernel.fn, g.codes, g.rows, g.codebook, absmax, g.bits, qt.group_size, out,
                       **meta)
        try:
            us = graph_time(fn)
        except Exception as exc:
            us = None
            print(f"  config {meta} failed: {exc}"[:200])
        rows.append({"config": meta, "graph_us": us,
                     "gbps": None if not us else (out.numel() * out.element_size() + g.codes.numel() * 4) / us / 1e3})
        print(f"  dequant {g.bits}b {meta}: {us if us is None else round(us, 1)} us", flush=True)
    return rows


def gemv_sweep(qt, m: int, dtype: torch.dtype, block_ns=(8, 16, 32, 64, 128), splits=(1, 2, 4, 8),
               warps=(4, 8)) -> list[dict]:
    """The GEMV kernel body at every ``BLOCK_N × SPLIT_K × num_warps`` (graph replay, µs): wider than the
    shipped autotune space, to show where its best lies."""
    import triton

    from lowra_kernels import lut_matmul as lm
    from lowra_kernels.layout import codes_per_word
    from lowra_kernels.lut import gemv_step

    pw = qt.packed()
    out_features, in_features, group_size, absmax = pw.out_features, pw.in_features, pw.group_size, pw.absmax
    g = qt.groups[0]
    words, pw2, aligned = gemv_step(g.bits, group_size)
    x = torch.randn(m, in_features, device=absmax.device, dtype=dtype)
    rows = []
    for block_n in block_ns:
        for split in splits:
            for nw in warps:
                ws = torch.empty(split, m, out_features, dtype=torch.float32, device=x.device)

                def fn(block_n=block_n, split=split, nw=nw, ws=ws):
                    lm._lut_gemv_kernel.fn[(triton.cdiv(g.rows.numel(), block_n), split)](
                        x, g.codes, g.rows, g.codebook, absmax, ws, m, g.rows.numel(), in_features, split,
                        x.stride(0), g.codes.stride(0), g.codebook.stride(0), absmax.stride(0), absmax.stride(1),
                        ws.stride(0), ws.stride(1), BITS=g.bits, PER_WORD=codes_per_word(g.bits), PW2=pw2,
                        WORDS=words, ALIGNED=aligned, GROUP=group_size, BLOCK_M=lm.gemv_block_m(m),
                        BLOCK_N=block_n, SPLIT_K=split, num_warps=nw, num_stages=2)
                us = graph_time(fn)
                rows.append({"bits": g.bits, "m": m, "BLOCK_N": block_n, "SPLIT_K": split, "num_warps": nw,
                             "graph_us": us})
    best = min((r for r in rows if r["graph_us"]), key=lambda r: r["graph_us"], default=None)
    print(f"  gemv sweep {g.bits}b M={m}: best {best}", flush=True)
    return rows


def crossover(qt, dtype: torch.dtype, ms=(1, 2, 4, 8, 16, 32, 64, 128, 256)) -> list[dict]:
    """Per M: the GEMV (M ≤ 16), the fused tl.dot kernel and dequantize + cuBLAS (graph replay, µs)."""
    from lowra_kernels import lut_matmul as lm

    in_features = qt.shape[1]
    pw = qt.packed()
    rows = []
    for m in ms:
        x = torch.randn(m, in_features, device=qt.device, dtype=dtype)
        row = {"bits": qt.groups[0].bits, "m": m}
        if m <= lm.GEMV_MAX_M:
            row["gemv_us"] = graph_time(lambda x=x: lm._lut_gemv(x, pw))
        row["fused_mm_us"] = graph_time(lambda x=x: lm._lut_mm(x, pw))
        row["dequant_cublas_us"] = graph_time(lambda x=x: x @ lm.dequantize_transient(pw, dtype).t())
        rows.append(row)
        print(f"  crossover {row}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x11008")
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "gpu_profile.json")
    parser.add_argument("--sweep", action="store_true",
                        help="instead: the GEMV over a wide config grid (M=1) and the M crossover of the three paths")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_profile needs a CUDA GPU")
    from lowra.atomic import write_text_atomic
    from lowra_kernels.lut_matmul import dequantize_transient, lut_matmul

    out_features, in_features = map(int, args.shape.split("x"))
    dev, dtype = torch.device("cuda"), torch.bfloat16
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "shape": [out_features, in_features],
              "dtype": str(dtype), "rows": []}
    if args.sweep:
        report.update(gemv_sweep=[], crossover=[])
        for bits in args.bits:
            qt = random_qweight(out_features, in_features, bits, dev)
            report["crossover"] += crossover(qt, dtype)
            write_text_atomic(args.out, json.dumps(report, indent=1))
            report["gemv_sweep"] += gemv_sweep(qt, 1, dtype)
            write_text_atomic(args.out, json.dumps(report, indent=1))
        return report
    w = torch.randn(out_features, in_features, device=dev, dtype=dtype)
    for m in (1, 16):
        x = torch.randn(m, in_features, device=dev, dtype=dtype)
        report["rows"].append({"bits": 16, "m": m, **measure(f"bf16 F.linear M={m}",
                                                              lambda x=x: torch.nn.functional.linear(x, w))})
    for bits in args.bits:
        qt = random_qweight(out_features, in_features, bits, dev)
        pw = qt.packed()
        report["rows"].append({"bits": bits, **measure(f"dequantize {bits}b",
                                                       lambda pw=pw: dequantize_transient(pw, dtype))})
        report["rows"][-1]["configs"] = dequant_configs(qt, dtype)
        for m in (1, 16):
            x = torch.randn(m, in_features, device=dev, dtype=dtype)
            report["rows"].append({"bits": bits, "m": m, **measure(f"lut_matmul {bits}b M={m}",
                                                                    lambda x=x, pw=pw: lut_matmul(x, pw))})
        write_text_atomic(args.out, json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
