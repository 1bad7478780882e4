"""Kernel benchmark: dequantize bandwidth and fused LUT matmul vs dense ``torch.matmul``.

``python -m experiments.bench.kernels [--quick] [--out PATH]`` prints a table and writes JSON
(device, peak bandwidth used and where it came from, shapes, bits, times, GB/s, % of peak,
speedups).

* Shapes ``out × in``: 4096×4096, 4096×11008, 11008×4096, 8192×8192 (``--quick``: each side ÷ 4).
* Bit plans: uniform 1, 2, 4 bits, and mixed plans averaging 1.15 (85 % 1-bit + 15 % 2-bit rows),
  1.5 (50 % 1 + 50 % 2) and 2.5 (75 % 2 + 25 % 4), rows interleaved at random.
* Dequantize: effective bandwidth = (codes + row indices + codebooks + fp16 absmax read, bf16
  matrix written) ÷ time.
* Matmul: ``y = x · deq(W)ᵀ`` at M ∈ {1, 16, 512, 2048} against ``torch.matmul`` with the dense
  weight in the activation dtype; forward+backward (grad_x only, as for a frozen base) at
  M ≥ 512.
* bitsandbytes NF4 dequantize where bitsandbytes and a GPU are present.
* ``--cpu-ratios``: the CPU backend (``lowra_kernels.cpu_backend``) side by side with what the hardware
  does with a dense matrix of the same shape, at 1 and 2 threads (``--threads``): dequantize to
  fp32 vs the fp16→fp32 conversion of the same matrix (both into a fresh tensor, as a user calls
  them, and into a preallocated one: the kernel alone), and ``lut_matmul`` at M = 1 vs dense fp32
  ``F.linear``; the PyTorch reference is timed beside it on the smaller shape. Shapes 2048×2048
  and 4096×11008, plans 1, 2, 4 bits and mix1.5. Writes ``results/bench/kernels_cpu_ratios.json``.

``--static`` (no GPU needed) prints and writes a **static estimate** instead
(``results/bench/kernels_static_estimate.json``): the kernels are compiled for sm_90 and their SASS
counted (``lowra_kernels.compile_check``) to give, for a 4096×11008 layer, the bytes moved vs the HBM
floor, the warp-instructions per weight of the GEMV's K loop and of the dequantize kernel, and from
those an H100 time bound ``max(bytes / 3.0 TB/s, warp-instructions / (528 schedulers × 1.755 GHz))``
compared with bf16 (GEMV: the bf16 weight read; training: cuBLAS fwd + grad_x at 790 TFLOP/s).
Mixed plans (mix1.15, mix1.5, mix2.5) get the dequantize and training rows as the row-weighted sum
of the per-width launches.
It is an estimate from instruction counts and peak rates — it says whether a change moves toward
the GPU targets, not what a GPU measures.

On a CUDA device the Triton kernels run (bf16 activations); every timing flushes L2 first (a
256 MiB write) and is taken with CUDA events, median of ``--reps``. On a CPU-only machine the
**C++ CPU backend** is timed (fp32 activations, the last-level cache flushed with a 64 MiB write) and
the table says so; the peak bandwidth there is a measured copy bandwidth, not a datasheet value.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lowra.atomic import write_text_atomic

REPO = Path(__file__).resolve().parents[2]
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192))
PLANS: dict[str, dict[int, float]] = {
    "1": {1: 1.0},
    "2": {2: 1.0},
    "3": {3: 1.0},
    "4": {4: 1.0},
    "mix1.15": {1: 0.85, 2: 0.15},
    "mix1.5": {1: 0.5, 2: 0.5},
    "mix2.5": {2: 0.75, 4: 0.25},
}
MS = (1, 16, 512, 2048)
# HBM peaks (GB/s) by device-name fragment, used when the driver does not report clocks.
DATASHEET_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0,
                  "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0, "L40S": 864.0,
                  "RTX 4090": 1008.0, "RTX 3090": 936.0, "RTX 3080": 760.0}


# ------------------------------------------------------------------------------------ timing
class Timer:
    """Median time (s) of a callable with a cache flush before every repetition."""

    def __init__(self, device: torch.device, reps: int, min_time: float) -> None:
        self.device = device
        self.reps = reps
        self.min_time = min_time
        flush_mib = 256 if device.type == "cuda" else 64
        self.flush_buf = torch.empty(flush_mib * 2**20 // 4, dtype=torch.float32, device=device)

    def __call__(self, fn: Callable[[], object], warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        times: list[float] = []
        start_all = time.perf_counter()
        while len(times) < self.reps or (
            time.perf_counter() - start_all < self.min_time and len(times) < 10 * self.reps
        ):
            self.flush_buf.zero_()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            if self.device.type == "cpu" and len(times) >= 3 and sum(times) > 4 * self.min_time:
                break
        return statistics.median(times)


def peak_bandwidth(device: torch.device, timer: Timer) -> tuple[float, str]:
    """Peak memory bandwidth in GB/s and where the number comes from."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        clock_khz = getattr(props, "memory_clock_rate", 0)
        bus_bits = getattr(props, "memory_bus_width", 0)
        if clock_khz and bus_bits:
            return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "driver: 2 × memory clock × bus width"
        for frag, gbps in DATASHEET_GBPS.items():
            if frag in props.name:
                return gbps, f"datasheet ({frag})"
        raise RuntimeError(f"unknown peak bandwidth for {props.name}")
    src = torch.empty(64 * 2**20, dtype=torch.float32)  # 256 MiB, beyond any cache
    dst = torch.empty_like(src)
    src.fill_(1.0)
    t = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / t / 1e9, "measured: 256 MiB tensor copy (read + write) on this CPU"


# ------------------------------------------------------------------------------------ inputs
def plan_bits(out_features: int, plan: dict[int, float], gen: torch.Generator) -> torch.Tensor:
    """Bits per row for a plan (fractions of rows per width), interleaved at random."""
    counts = {b: int(round(f * out_features)) for b, f in plan.items()}
    last = max(plan, key=plan.get)
    counts[last] += out_features - sum(counts.values())
    bits = torch.cat([torch.full((n,), b, dtype=torch.int64) for b, n in counts.items()])
    return bits[torch.randperm(out_features, generator=gen)]


def make_qtensor(out_features: int, in_features: int, plan: dict[int, float], device: torch.device, seed: int = 0):
    """A QuantizedTensor of a random weight with per-row random codebooks (fp16 absmax)."""
    from lowra.format import QuantizedTensor

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen).to(device)
    bits = plan_bits(out_features, plan, gen).to(device)
    codebooks = {
        b: torch.rand(out_features, 2**b, generator=gen).mul(2).sub(1).to(device) for b in plan
    }
    return QuantizedTensor.from_codebooks(weight, bits, codebooks, group_size=64)


def stored_bytes(qt) -> int:
    """Bytes a dequantize reads: codes, row indices, codebooks, fp16 absmax."""
    return sum(g.codes.nbytes + g.rows.nbytes + g.codebook.nbytes for g in qt.groups) + qt.scales.absmax.nbytes


# ------------------------------------------------------------------------------------ benchmark
def _fwd_bwd(fn: Callable, x: torch.Tensor, w: object, grad_y: torch.Tensor, *extra: object) -> None:
    """One forward ``fn(x, w, *extra)`` and its backward (grad for ``x`` only)."""
    fn(x, w, *extra).backward(grad_y)
    x.grad = None


def run(args: argparse.Namespace) -> dict:
    from lowra_kernels.dequantize import dequantize as dequantize_rows
    from lowra_kernels.lut_linear import lut_linear
    from lowra_kernels.lut_matmul import lut_matmul

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    gpu = device.type == "cuda"
    backend = "triton" if gpu else "cpu"
    act_dtype = torch.bfloat16 if gpu else torch.float32
    timer = Timer(device, args.reps, args.min_time)
    peak, peak_src = peak_bandwidth(device, timer)
    shapes = [(o // 4, i // 4) for o, i in SHAPES] if args.quick else list(SHAPES)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    plans = args.plans or list(PLANS)
    ms = [m for m in (args.ms or MS)]
    bnb = None
    if importlib.util.find_spec("bitsandbytes") is None:
        bnb_state = "not installed"
    elif not gpu:  # (importing it on CPU probes the HF ``kernels`` package and finds ours)
        bnb_state = "installed, needs CUDA: not timed"
    else:
        import bitsandbytes as bnb

        bnb_state = f"bitsandbytes {bnb.__version__}"
    load_before = os.getloadavg()

    rows: list[dict] = []
    dense_cache: dict[tuple, float] = {}
    for out_features, in_features in shapes:
        dense_w = torch.randn(out_features, in_features, device=device).to(act_dtype)
        for plan_name in plans:
            qt = make_qtensor(out_features, in_features, PLANS[plan_name], device)
            pw = qt.packed()
            out = torch.empty(out_features, in_features, dtype=torch.bfloat16, device=device)

            def deq(out=out, pw=pw, backend=backend):
                for bits, codes, rows_, codebook in pw.groups():
                    dequantize_rows(codes, rows_, codebook, pw.absmax, bits, pw.group_size, out, backend)

            t_deq = timer(deq)
            moved = stored_bytes(qt) + out.nbytes
            row = {
                "shape": [out_features, in_features], "plan": plan_name,
                "nominal_bits": round(qt.nominal_bits, 4), "effective_bits": round(qt.effective_bits, 4),
                "dequant_ms": t_deq * 1e3, "dequant_bytes": moved,
                "dequant_gbps": moved / t_deq / 1e9, "dequant_pct_peak": 100 * moved / t_deq / 1e9 / peak,
            }
            if True:  # the reference beside the fast path (Triton on GPU, C++ on CPU)
                def deq_ref(out=out, pw=pw):
                    deq(out, pw, "torch")

                row["dequant_ref_ms"] = timer(deq_ref) * 1e3
                row["dequant_speedup_vs_ref"] = row["dequant_ref_ms"] / row["dequant_ms"]
            del out
            matmul = {}
            for m in ms:
                x = torch.randn(m, in_features, device=device).to(act_dtype)
                key = (out_features, in_features, m)
                if key not in dense_cache:
                    dense_cache[key] = timer(partial(torch.matmul, x, dense_w.t()))
                t_dense = dense_cache[key]
                t_lut = timer(partial(lut_matmul, x, pw, backend))
                entry = {"dense_ms": t_dense * 1e3, "lut_ms": t_lut * 1e3, "speedup": t_dense / t_lut}
                if m >= 512:
                    xg = x.clone().requires_grad_(True)
                    gy = torch.randn(m, out_features, device=device).to(act_dtype)
                    fb_key = key + ("fwd+bwd",)
                    if fb_key not in dense_cache:
                        dense_cache[fb_key] = timer(partial(_fwd_bwd, torch.matmul, xg, dense_w.t(), gy))
                    tensors, meta = pw.op_args()
                    t_fb = timer(partial(_fwd_bwd, lut_linear, xg, tensors, gy, None, None, None, meta, 1.0, backend))
                    entry.update({"dense_fwd_bwd_ms": dense_cache[fb_key] * 1e3, "lut_fwd_bwd_ms": t_fb * 1e3,
                                  "fwd_bwd_ratio": t_fb / dense_cache[fb_key]})
                matmul[str(m)] = entry
            row["matmul"] = matmul
            rows.append(row)
            print(format_row(row), flush=True)
        if bnb is not None and gpu:
            import bitsandbytes.functional as bnbf

            packed, state = bnbf.quantize_4bit(dense_w, quant_type="nf4")
            t_bnb = timer(partial(bnbf.dequantize_4bit, packed, state))
            moved = packed.nbytes + state.absmax.nbytes + dense_w.numel() * 2
            rows.append({"shape": [out_features, in_features], "plan": "bnb-nf4", "nominal_bits": 4,
                         "dequant_ms": t_bnb * 1e3, "dequant_bytes": moved, "dequant_gbps": moved / t_bnb / 1e9,
                         "dequant_pct_peak": 100 * moved / t_bnb / 1e9 / peak, "matmul": {}})
            print(format_row(rows[-1]), flush=True)
        del dense_w

    if gpu:
        name = torch.cuda.get_device_name(device)
        path = "Triton kernels (bf16 activations)"
    else:
        name = platform.processor() or platform.machine()
        path = "C++ CPU backend (lowra_kernels.cpu_backend, fp32 activations) — no GPU: Triton kernels NOT timed"
    return {
        "device": name, "device_type": device.type, "path": path, "quick": bool(args.quick),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "peak_bandwidth_gbps": peak, "peak_bandwidth_source": peak_src,
        "activation_dtype": str(act_dtype), "dequant_output_dtype": "torch.bfloat16",
        "group_size": 64, "absmax": "fp16", "bitsandbytes": bnb_state,
        "timing": ("CUDA events, L2 flushed (256 MiB write) before each rep, median" if gpu
                   else "perf_counter, 64 MiB cache flush before each rep, median"),
        "reps": args.reps, "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "cpu_count": os.cpu_count(), "rows": rows,
    }


# ------------------------------------------------------------------------------------ static estimate
H100 = {"hbm_bytes_per_s": 3.0e12, "schedulers": 528, "clock_hz": 1.755e9, "bf16_flops": 790e12}
STATIC_SHAPE = (4096, 11008)  # out × in
STATIC_TRAIN_M = 2048


def _compile_sass(kernel: str, bits: int, dtype: str, extra: dict, cfg: Any) -> dict:
    from lowra_kernels.compile_check import compile_variant

    r = compile_variant({"kernel": kernel, "arch": 90, "bits": bits, "dtype": dtype, "extra": extra,
                         "config_index": 0, "config": dict(cfg.kwargs), "num_warps": cfg.num_warps,
                         "num_stages": cfg.num_stages, "maxnreg": cfg.maxnreg}, sass=True)
    if not r["ok"]:
        raise RuntimeError(f"{kernel} bits={bits} {cfg}: {r['error']}")
    return r


def static_estimate(bits_list: tuple[int, ...] = (1, 2, 3, 4), dtype: str = "bfloat16") -> dict:
    """Static H100 estimate from the sm_90 SASS of the shipped configs (see the module docstring)."""
    from lowra_kernels.compile_check import _args, _configs
    from lowra_kernels.layout import codes_per_word, num_groups
    from lowra_kernels.lut import dequant_step, gemv_step

    out_f, in_f = STATIC_SHAPE
    weights = out_f * in_f
    issue = H100["schedulers"] * H100["clock_hz"]  # warp-instructions per second
    bw = H100["hbm_bytes_per_s"]
    t_bf16_gemv = weights * 2 / bw
    t_gemm = 2 * STATIC_TRAIN_M * weights / H100["bf16_flops"]
    rows = []
    for bits in bits_list:
        valid = dequant_step(bits, 64)[0] * codes_per_word(bits)  # codes per row per K step (dequantize)
        gemv_valid = gemv_step(bits, 64)[0] * codes_per_word(bits)  # the GEMV's K step
        packed = out_f * -(-in_f // codes_per_word(bits)) * 4
        scales = out_f * num_groups(in_f, 64) * 2 + out_f * (2 ** bits) * 2 + out_f * 8
        # GEMV M = 1: instructions of the K loop per weight, best shipped config
        gemv = []
        for cfg in _configs("lut_gemv", _args("lut_gemv", bits, dtype, {"BLOCK_M": 1})):
            r = _compile_sass("lut_gemv", bits, dtype, {"BLOCK_M": 1}, cfg)
            per_weight = r["sass"]["main_loop_instructions"] * cfg.num_warps / (cfg.kwargs["BLOCK_N"] * gemv_valid)
            gemv.append({"config": dict(cfg.kwargs), "num_warps": cfg.num_warps, "registers": r["registers"],
                         "loop_instructions": r["sass"]["main_loop_instructions"],
                         "warp_instructions_per_weight": round(per_weight, 4)})
        best = min(gemv, key=lambda g: g["warp_instructions_per_weight"])
        gemv_bytes = packed + scales + in_f * 2 + out_f * 2
        t_gemv = max(gemv_bytes / bw, best["warp_instructions_per_weight"] * weights / issue)
        # dequantize to bf16 (training path): one program = BLOCK_R rows × STEPS K steps, no loop
        deq = []
        for cfg in _configs("dequantize", _args("dequantize", bits, dtype, {})):
            r = _compile_sass("dequantize", bits, dtype, {}, cfg)
            tile = cfg.kwargs["BLOCK_R"] * cfg.kwargs["STEPS"] * valid
            deq.append({"config": dict(cfg.kwargs), "num_warps": cfg.num_warps, "registers": r["registers"],
                        "instructions": r["sass"]["instructions"],
                        "warp_instructions_per_weight": round(r["sass"]["instructions"] * cfg.num_warps / tile, 4)})
        best_deq = min(deq, key=lambda g: g["warp_instructions_per_weight"])
        deq_bytes = packed + scales + weights * 2
        t_deq = max(deq_bytes / bw, best_deq["warp_instructions_per_weight"] * weights / issue)
        # training fwd + grad_x: dequantize twice (forward, backward) + two cuBLAS GEMMs, vs two bf16 GEMMs
        t_train = 2 * t_deq + 2 * t_gemm
        rows.append({
            "bits": bits, "shape": [out_f, in_f], "dtype": dtype,
            "gemv_m1": {"configs": gemv, "best": best, "bytes": gemv_bytes, "bytes_floor_us": gemv_bytes / bw * 1e6,
                        "estimate_us": t_gemv * 1e6, "bf16_us": t_bf16_gemv * 1e6,
                        "speedup_vs_bf16": t_bf16_gemv / t_gemv},
            "dequantize": {"configs": deq, "best": best_deq, "bytes": deq_bytes, "bytes_floor_us": deq_bytes / bw * 1e6,
                           "estimate_us": t_deq * 1e6, "pct_of_hbm_peak": 100 * (deq_bytes / bw) / t_deq},
            "train_fwd_bwd_m2048": {"estimate_us": t_train * 1e6, "bf16_us": 2 * t_gemm * 1e6,
                                    "ratio_vs_bf16": t_train / (2 * t_gemm)},
        })
    mixes = static_mixes(rows, t_gemm)
    return {"kind": "static estimate from sm_90 SASS instruction counts and H100 peak rates (not a measurement)",
            "h100": H100, "shape": list(STATIC_SHAPE), "train_m": STATIC_TRAIN_M, "rows": rows, "mixes": mixes,
            "targets": {"gemv_2bit_warp_instructions_per_weight": 0.35, "train_ratio_vs_bf16": 1.25}}


def static_mixes(rows: list[dict], t_gemm: float) -> list[dict]:
    """Dequantize and training estimates of the mixed ``PLANS`` whose widths are all in ``rows``.

    A mixed weight is dequantized by one launch per stored width over that width's share of the
    rows, so its time (and bytes floor) is the row-weighted sum of the per-width estimates (launch
    latency not included); training is two dequantizes plus two GEMMs of ``t_gemm`` seconds each.
    """
    by_bits = {r["bits"]: r for r in rows}
    mixes = []
    for name, plan in PLANS.items():
        if len(plan) < 2 or not set(plan) <= set(by_bits):
            continue
        t_mix = sum(frac * by_bits[b]["dequantize"]["estimate_us"] for b, frac in plan.items()) * 1e-6
        floor = sum(frac * by_bits[b]["dequantize"]["bytes_floor_us"] for b, frac in plan.items()) * 1e-6
        mixes.append({"plan": name, "row_fractions": {str(b): f for b, f in plan.items()},
                      "dequantize": {"estimate_us": t_mix * 1e6, "bytes_floor_us": floor * 1e6,
                                     "pct_of_hbm_peak": 100 * floor / t_mix},
                      "train_fwd_bwd_m2048": {"estimate_us": (2 * t_mix + 2 * t_gemm) * 1e6,
                                              "bf16_us": 2 * t_gemm * 1e6,
                                              "ratio_vs_bf16": (2 * t_mix + 2 * t_gemm) / (2 * t_gemm)}})
    return mixes


def print_static(est: dict) -> None:
    print(f"STATIC ESTIMATE (sm_90 SASS + H100 peaks; not a measurement) for {est['shape'][0]}×{est['shape'][1]}")
    print(f"{'bits':>4} | {'GEMV wi/w':>9} {'est µs':>7} {'floor µs':>8} {'×bf16':>6} | "
          f"{'deq wi/w':>8} {'est µs':>7} {'%HBM':>5} | {'train/bf16':>10}")
    for r in est["rows"]:
        g, d, t = r["gemv_m1"], r["dequantize"], r["train_fwd_bwd_m2048"]
        print(f"{r['bits']:>4} | {g['best']['warp_instructions_per_weight']:>9.3f} {g['estimate_us']:>7.1f} "
              f"{g['bytes_floor_us']:>8.1f} {g['speedup_vs_bf16']:>6.2f} | "
              f"{d['best']['warp_instructions_per_weight']:>8.3f} {d['estimate_us']:>7.1f} "
              f"{d['pct_of_hbm_peak']:>5.0f} | "
              f"{t['ratio_vs_bf16']:>10.3f}")
    for m in est.get("mixes", []):
        d, t = m["dequantize"], m["train_fwd_bwd_m2048"]
        print(f"{m['plan']:>7} (rows {m['row_fractions']}): deq est {d['estimate_us']:.1f} µs, "
              f"{d['pct_of_hbm_peak']:.0f} % HBM | train/bf16 {t['ratio_vs_bf16']:.3f}")


CPU_RATIO_SHAPES = ((2048, 2048), (4096, 11008))
CPU_RATIO_PLANS = ("1", "2", "4", "mix1.5")


def run_cpu_ratios(args: argparse.Namespace) -> dict:
    """Time the CPU backend against dense fp16→fp32 conversion and fp32 ``F.linear`` (module doc)."""
    import torch.nn.functional as F

    from lowra_kernels import cpu_backend
    from lowra_kernels.dequantize import dequantize as dequantize_rows
    from lowra_kernels.lut_matmul import lut_matmul

    if not cpu_backend.available():
        raise RuntimeError(f"the CPU backend did not build: {cpu_backend.failure()}")
    device = torch.device("cpu")
    timer = Timer(device, args.reps, args.min_time)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else list(CPU_RATIO_SHAPES)
    plans = args.plans or list(CPU_RATIO_PLANS)
    threads_before = torch.get_num_threads()
    load_before = os.getloadavg()
    rows: list[dict] = []
    try:
        qts = {(shape, plan): make_qtensor(*shape, PLANS[plan], device) for shape in shapes for plan in plans}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for out_features, in_features in shapes:
                w16 = torch.randn(out_features, in_features).half()
                w32 = w16.float()
                out = torch.empty_like(w32)
                x = torch.randn(1, in_features)
                t_conv = timer(w16.float)
                t_conv_pre = timer(partial(out.copy_, w16))
                t_linear = timer(partial(F.linear, x, w32))
                for plan in plans:
                    qt = qts[((out_features, in_features), plan)]
                    pw = qt.packed()

                    def deq_pre(backend, out=out, pw=pw):
                        for bits, codes, rows_, codebook in pw.groups():
                            dequantize_rows(codes, rows_, codebook, pw.absmax, bits, pw.group_size, out, backend)

                    row = {"threads": threads, "shape": [out_features, in_features], "plan": plan,
                           "nominal_bits": round(qt.nominal_bits, 4),
                           "fp16_to_fp32_ms": t_conv * 1e3, "fp16_to_fp32_prealloc_ms": t_conv_pre * 1e3,
                           "dense_linear_m1_ms": t_linear * 1e3,
                           "dequant_ms": timer(partial(qt.dequantize, torch.float32, "cpu")) * 1e3,
                           "dequant_prealloc_ms": timer(partial(deq_pre, "cpu")) * 1e3,
                           "lut_m1_ms": timer(partial(lut_matmul, x, pw, "cpu")) * 1e3}
                    row["dequant_ratio"] = row["dequant_ms"] / row["fp16_to_fp32_ms"]
                    row["dequant_prealloc_ratio"] = row["dequant_prealloc_ms"] / row["fp16_to_fp32_prealloc_ms"]
                    row["lut_m1_ratio"] = row["lut_m1_ms"] / row["dense_linear_m1_ms"]
                    if out_features * in_features <= 2048 * 2048 and not args.no_ref:
                        row["dequant_ref_ms"] = timer(partial(deq_pre, "torch"), warmup=1) * 1e3
                        row["lut_m1_ref_ms"] = timer(partial(lut_matmul, x, pw, "torch"), warmup=1) * 1e3
                    rows.append(row)
                    print(format_cpu_ratio_row(row), flush=True)
                del w16, w32, out
    finally:
        torch.set_num_threads(threads_before)
    return {
        "device": platform.processor() or platform.machine(), "device_type": "cpu",
        "path": "lowra_kernels.cpu_backend (C++ extension, AVX2)" if cpu_backend.extension().has_avx2()
        else "lowra_kernels.cpu_backend (C++ extension, scalar build)",
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "threads": list(args.threads),
        "group_size": 64, "absmax": "fp16", "activation_dtype": "torch.float32",
        "timing": "perf_counter, 64 MiB cache flush before each rep, median",
        "reps": args.reps, "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "targets": {"dequant_ratio": 3.0, "lut_m1_ratio": 1.5}, "rows": rows,
    }


def format_cpu_ratio_row(row: dict) -> str:
    shape = "×".join(map(str, row["shape"]))
    s = (f"{row['threads']}t {shape:>10} {row['plan']:>6}  deq {row['dequant_ms']:8.2f} ms / fp16→fp32 "
         f"{row['fp16_to_fp32_ms']:8.2f} = {row['dequant_ratio']:5.2f}×  (prealloc {row['dequant_prealloc_ms']:7.2f}/"
         f"{row['fp16_to_fp32_prealloc_ms']:7.2f} = {row['dequant_prealloc_ratio']:5.2f}×)  "
         f"M=1 lut {row['lut_m1_ms']:7.3f} / linear {row['dense_linear_m1_ms']:7.3f} = {row['lut_m1_ratio']:5.2f}×")
    if "dequant_ref_ms" in row:
        s += f"  [ref deq {row['dequant_ref_ms']:.1f} ms, lut {row['lut_m1_ref_ms']:.1f} ms]"
    return s


def format_row(row: dict) -> str:
    shape = "×".join(map(str, row["shape"]))
    head = f"{shape:>11} {row['plan']:>8} {row['nominal_bits']:>5.2f}b  deq {row['dequant_ms']:9.3f} ms " \
           f"{row['dequant_gbps']:8.1f} GB/s {row['dequant_pct_peak']:5.1f}%"
    parts = []
    for m, e in row["matmul"].items():
        s = f"M={m}: {e['lut_ms']:.3f}/{e['dense_ms']:.3f} ms ×{e['speedup']:.2f}"
        if "fwd_bwd_ratio" in e:
            s += f" fb {e['fwd_bwd_ratio']:.2f}×"
        parts.append(s)
    return head + ("  | " + " | ".join(parts) if parts else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shapes ÷ 4 on each side (for the CPU run)")
    parser.add_argument("--cpu", action="store_true", help="time the CPU reference path even with a GPU")
    parser.add_argument("--shapes", nargs="*", help="override shapes, e.g. 4096x11008")
    parser.add_argument("--plans", nargs="*", choices=list(PLANS))
    parser.add_argument("--ms", nargs="*", type=int, help="activation rows M (default 1 16 512 2048)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 50 GPU, 3 CPU)")
    parser.add_argument("--min-time", type=float, default=0.05, help="keep repeating until this long (s)")
    parser.add_argument("--static", action="store_true",
                        help="no timing: static H100 estimate from the compiled sm_90 SASS (no GPU needed)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cpu-ratios", action="store_true",
                        help="CPU backend vs fp16→fp32 conversion and dense F.linear (see module doc)")
    parser.add_argument("--threads", nargs="*", type=int, default=[1, 2], help="thread counts for --cpu-ratios")
    parser.add_argument("--no-ref", action="store_true", help="--cpu-ratios: skip the slow reference timings")
    args = parser.parse_args(argv)
    if args.static:
        est = static_estimate()
        print_static(est)
        out = args.out or REPO / "results" / "bench" / "kernels_static_estimate.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(est, indent=1))
        print(f"wrote {out}")
        return
    gpu = torch.cuda.is_available() and not args.cpu
    if args.reps is None:
        args.reps = 50 if gpu else (7 if args.cpu_ratios else 3)
    if args.cpu_ratios:
        if args.plans and not set(args.plans) <= set(PLANS):
            raise ValueError(f"plans must be among {list(PLANS)}")
        result = run_cpu_ratios(args)
        out = args.out or REPO / "results" / "bench" / "kernels_cpu_ratios.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"\n{result['path']}; {result['device']}; threads {result['threads']}; "
              f"load average before/after {result['load_average_before_after']}")
        print(f"wrote {out}")
        return
    result = run(args)
    out = args.out or REPO / "results" / "bench" / ("kernels_gpu.json" if gpu else "kernels_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{result['path']}; device {result['device']}; peak {result['peak_bandwidth_gbps']:.1f} GB/s "
          f"({result['peak_bandwidth_source']}); bitsandbytes: {result['bitsandbytes']}")
    print("columns: shape plan bits | dequant time, GB/s, % of peak | M: lut/dense ms, speedup, fwd+bwd ratio")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
