"""Benchmark of the learned codebooks (issue: foundation).

1. The real model: total weight SSE of ``lowra`` (learned per-row codebooks) vs ``nf``
   (NormalFloat) at 1, 2 and 4 bits over all linear layers of stories260K, with nominal and
   effective bits of each.
2. Speed and memory: time and peak extra resident memory of ``learn_codebooks`` at 1, 2 and 4 bits
   on heavy-tailed (Student-t, df = 5) matrices of Llama-2-7B sizes, each in a fresh subprocess.

``python -m experiments.bench.codebooks`` prints both tables and writes
``results/bench/codebooks_cpu.json``. Also reachable as ``python -m experiments.bench.pipeline
--only codebooks``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SHAPES = ((4096, 4096), (4096, 11008))


def assets_dir() -> Path:
    """``$LOWRA_ASSETS`` or ``../shared/assets`` beside the repository."""
    return Path(os.environ.get("LOWRA_ASSETS", REPO.parent / "shared" / "assets"))


def real_model_sse(group_size: int = 64) -> list[dict]:
    """SSE and bits of lowra vs nf on every linear layer of the real stories260K."""
    from safetensors.torch import load_file

    from lowra import learn_codebooks, quantize

    tensors = load_file(str(assets_dir() / "models" / "stories260K" / "model.safetensors"))
    linear = [v.float() for k, v in sorted(tensors.items()) if k.endswith("proj.weight")]
    numel = sum(w.numel() for w in linear)
    rows = []
    for b in (1, 2, 4):
        lowra_sse = nf_sse = 0.0
        lowra_bytes = nf_bytes = 0
        for w in linear:
            learned = learn_codebooks(w, bits=(1, 2, 4), group_size=group_size)
            q = quantize(w, b, method="lowra", group_size=group_size, codebooks=learned)
            n = quantize(w, b, method="nf", group_size=group_size)
            lowra_sse += float(((w - q.dequantize()) ** 2).sum())
            nf_sse += float(((w - n.dequantize()) ** 2).sum())
            lowra_bytes += q.nbytes
            nf_bytes += n.nbytes
        rows.append({
            "bits": b, "sse_lowra": lowra_sse, "sse_nf": nf_sse, "ratio": lowra_sse / nf_sse,
            "nominal_bits": float(b),
            "effective_bits_lowra": lowra_bytes * 8 / numel, "effective_bits_nf": nf_bytes * 8 / numel,
        })
    return rows


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_one(rows: int, cols: int, seed: int = 0) -> dict:
    """Time and peak extra RSS of learning 1/2/4-bit codebooks for one Student-t matrix."""
    from lowra import learn_codebooks

    torch.manual_seed(seed)
    w = torch.empty(rows, cols)
    for start in range(0, rows, 256):  # sample in slices so the baseline RSS is just W
        w[start:start + 256] = torch.distributions.StudentT(5.0).sample((min(256, rows - start), cols))
    learn_codebooks(w[:64], bits=(1, 2, 4))  # warm-up
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    res = learn_codebooks(w, bits=(1, 2, 4))
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    weight_bytes = w.numel() * 4
    return {
        "shape": [rows, cols], "seconds": seconds, "iterations": res.iterations,
        "peak_extra_bytes": peak[0] - base, "peak_extra_over_weight": (peak[0] - base) / weight_bytes,
        "threads": torch.get_num_threads(),
    }


def speed_table(shapes=SHAPES) -> list[dict]:
    """Run ``measure_one`` per shape in a fresh interpreter (clean memory baseline)."""
    out = []
    for rows, cols in shapes:
        code = (
            "import json; from experiments.bench.codebooks import measure_one; "
            f"print(json.dumps(measure_one({rows}, {cols})))"
        )
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def bench_codebooks(args: argparse.Namespace | None = None) -> dict:
    """Both tables, printed, as one JSON-able dict."""
    quality = real_model_sse()
    print("\nLearned codebooks vs NormalFloat on stories260K (all 35 linear layers, group 64)")
    print(f"{'bits':>4} {'SSE lowra':>11} {'SSE nf':>11} {'ratio':>6} {'eff. bits lowra':>16} {'eff. bits nf':>13}")
    for r in quality:
        print(f"{r['bits']:>4} {r['sse_lowra']:>11.2f} {r['sse_nf']:>11.2f} {r['ratio']:>6.3f} "
              f"{r['effective_bits_lowra']:>16.3f} {r['effective_bits_nf']:>13.3f}")
    speed = speed_table()
    print(f"\nlearn_codebooks at 1, 2, 4 bits, Student-t(5) weights, CPU ({torch.get_num_threads()} threads)")
    print(f"{'shape':>12} {'seconds':>8} {'peak extra MiB':>15} {'× fp32 weight':>14}")
    for r in speed:
        print(f"{'×'.join(map(str, r['shape'])):>12} {r['seconds']:>8.2f} {r['peak_extra_bytes'] / 2**20:>15.1f} "
              f"{r['peak_extra_over_weight']:>14.2f}")
    return {"device": "cpu", "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "real_model": quality, "speed": speed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "results" / "bench" / "codebooks_cpu.json"))
    args = parser.parse_args()
    result = bench_codebooks(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
