"""Peak host memory of one layer's streamed work, measured: pass 1 (``lowra.pipeline.layer_table``:
codebooks + K-FAC row errors) and pass 2 (``lowra.layer_quantization.quantize_layer``: quantize + the
calibrated init) of the default ``LowRAConfig()``, for one weight ``[out, in]`` with its input Gram.

Each case runs in a fresh interpreter: the weight (fp32), its Gram ``H [in, in]`` (float64, as the
statistics store returns it) and output factor are built, the resident set is read, VmHWM is reset
(``/proc/self/clear_refs``), the stage runs, and ``peak − before`` is the layer's working memory
beyond its inputs. ``experiments.bench.fit_table --quantize`` fits these peaks to
``a·out·in + b·in² + c`` and computes a 70B model's streamed peak from them.

    python -m experiments.bench.layer_peaks                       # default shapes, results/bench/layer_peaks_cpu.json
    python -m experiments.bench.layer_peaks --shapes 576x1536 1024x2816 --repo /path/to/other/checkout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "results" / "bench" / "layer_peaks_cpu.json"
SHAPES = ("576x1536", "1536x576", "1024x2816", "2816x1024")


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def one(out: int, inp: int, phase: str) -> dict[str, Any]:
    """One case in this interpreter (``phase``: pass1 | pass2)."""
    import torch

    from lowra.config import LowRAConfig

    try:
        from lowra.layer_quantization import quantize_layer
        from lowra.pipeline import Calibration, LayerStats, layer_table, resolve_settings
    except ImportError:  # a checkout from before the module renames (--repo of an older commit)
        from lowra.quantize_layers import quantize_layer
        from lowra.stages import Calibration, LayerStats, layer_table, resolve_settings

    torch.manual_seed(0)
    s = resolve_settings(LowRAConfig(bits=2.0, rank=8, alpha=16.0), progress=False)
    w = torch.randn(out, inp) * 0.02
    a = torch.randn(inp, 64, dtype=torch.float64)
    h = a @ a.T / 64 + torch.eye(inp, dtype=torch.float64)  # SPD; its values do not change the memory
    del a
    g = torch.rand(out, dtype=torch.float64)
    calib = Calibration(hessians=LayerStats("hessian", values={"x": h}),
                        output_grads=LayerStats("output_grad", values={"x": g}))
    del h
    books = None
    if phase == "pass2":
        books, _ = layer_table("x", w, s, Calibration(hessians=LayerStats("hessian", values={"x": calib.hessians["x"]}),
                                                      output_grads=LayerStats("output_grad", values={"x": g})))
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    if phase == "pass1":
        layer_table("x", w, s, calib)
    else:
        bits = torch.full((out,), 2, dtype=torch.int64)
        times = {"quantize_s": 0.0, "loftq_s": 0.0}
        quantize_layer("x", w, None, s, bits, books, calib, times)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    return {"out": out, "in": inp, "phase": phase, "peak_above_inputs_bytes": peak - before,
            "inputs_bytes": out * inp * 4 + inp * inp * 8, "seconds": round(seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="OUTxIN")
    ap.add_argument("--phases", nargs="+", default=["pass1", "pass2"])
    ap.add_argument("--repo", type=Path, default=REPO, help="checkout whose lowra is measured (cwd of each case)")
    ap.add_argument("--json", type=Path, default=OUT)
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: OUT IN PHASE
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(int(args.one[0]), int(args.one[1]), args.one[2])), flush=True)
        return
    rows = []
    for shape in args.shapes:
        out, inp = (int(v) for v in shape.split("x"))
        for phase in args.phases:
            code = (f"import runpy, sys; sys.path.insert(0, {str(args.repo)!r}); sys.argv = ['x', '--one', '{out}', "
                    f"'{inp}', '{phase}']; runpy.run_path({__file__!r}, run_name='__main__')")
            env = {**os.environ, "PYTHONPATH": str(args.repo)}
            proc = subprocess.run([sys.executable, "-c", code], cwd=args.repo, env=env, stdout=subprocess.PIPE,
                                  text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{shape} {phase}: failed (exit {proc.returncode})")
            row = json.loads(lines[-1][len("RESULT "):])
            rows.append(row)
            print(f"{shape:>11} {phase}: peak above inputs {row['peak_above_inputs_bytes'] / 2**20:8.1f} MiB "
                  f"(inputs {row['inputs_bytes'] / 2**20:7.1f} MiB), {row['seconds']:.1f} s", flush=True)
    from lowra.atomic import write_text_atomic

    args.json.parent.mkdir(parents=True, exist_ok=True)
    load = Path("/proc/loadavg").read_text().split()[:3]
    write_text_atomic(args.json, json.dumps({"repo": str(args.repo), "loadavg": load, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
