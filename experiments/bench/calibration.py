"""Time and peak extra host memory of the calibration pass behind ``quant.error=kfac|fisher``.

Issue 12's budget for the pass: all stories260K layers ≤ 30 s, SmolLM2-135M ≤ 10 min, and peak extra
memory ≤ 2× the fp32 model. The model and the calibration windows are built exactly as the runner
builds them (Hydra config ``run`` with the given overrides, ``quant.options.calibration``); the pass
is ``lowra.error_tables.calibration_statistics`` with what the chosen error table asks for.

Memory is the process's resident set (``/proc/self/statm``) sampled every 10 ms by a thread
during the pass, minus the resident set just before it (model loaded and paged in by one no-grad
forward — safetensors weights are memory-mapped until first touched —, windows built): it counts
the Fisher/Gram accumulators, the gradients and the activations of one chunk. One case per
interpreter, so earlier allocations do not hide in the allocator.

    python -m experiments.bench.calibration                       # stories260K and SmolLM2 (if prepared)
    python -m experiments.bench.calibration --models stories260k --error fisher
Writes ``results/bench/calibration.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "results" / "bench" / "calibration.json"
MODELS = {"stories260k": [], "smollm2_135m": ["+model=smollm2_135m"]}
TARGETS = {"stories260k": 30.0, "smollm2_135m": 600.0}  # seconds (issue 12)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest resident set seen by a 10 ms sampling thread between ``start`` and ``stop``."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.01)

    def __enter__(self) -> PeakRSS:
        self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def measure(model_name: str, error: str, threads: int, samples: int | None = None,
            batch_size: int | None = None) -> dict[str, Any]:
    """One case in this interpreter: load as the runner does, then time the pass."""
    import torch
    from hydra import compose, initialize_config_dir

    from experiments.runner.config_check import CONF_DIR
    from experiments.runner.data import load_data
    from experiments.runner.setup import calibration_kwargs, load_model, load_tokenizer
    from lowra.error_tables import calibration_statistics
    from lowra.model_layers import find_target_linears

    torch.set_num_threads(threads)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        extra = [f"quant.options.calibration.samples={samples}"] if samples else []
        extra += [f"quant.options.calibration.batch_size={batch_size}"] if batch_size else []
        cfg = compose(config_name="run", overrides=[*MODELS[model_name], "quant=lowra", f"quant.error={error}", *extra])
    tokenizer = load_tokenizer(cfg.model)
    data = load_data(cfg.data, tokenizer, need_train=True)
    model = load_model(cfg.model, torch.device("cpu"))
    calib = calibration_kwargs(cfg, data)
    names = [n for n, _ in find_target_linears(model, list(cfg.model.target_modules))]
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    target_bytes = sum(dict(model.named_modules())[n].weight.numel() * 4 for n in names)
    with torch.no_grad():  # page the (memory-mapped) weights in: they are the model, not the pass's extra
        model(input_ids=calib["calibration"][:1])
    before = _rss()
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        stats = calibration_statistics(model, names, calib["calibration"], calib["calibration_batch_size"],
                                       fisher=error == "fisher", hessians=error == "kfac",
                                       output_grads=error == "kfac", wanted=f"quant.error={error}")
    seconds = time.perf_counter() - t0
    held = sum(t.numel() * t.element_size() for d in (stats.fisher, stats.hessians, stats.output_grads)
               for t in {id(v): v for v in d.values()}.values())
    extra = peak.peak - before
    return {
        "model": model_name, "error": error, "threads": threads, "layers": len(names),
        "tokens": int(calib["calibration"].numel()), "batch_size": calib["calibration_batch_size"],
        "seconds": round(seconds, 2), "target_seconds": TARGETS[model_name],
        "fp32_model_bytes": fp32_bytes, "target_weight_bytes_fp32": target_bytes,
        "statistics_bytes": held, "peak_extra_rss_bytes": extra,
        "peak_extra_over_fp32_model": round(extra / fp32_bytes, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--error", default="kfac", choices=["kfac", "fisher"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=None,
                    help="calibration windows (default: conf/quant/lowra.yaml's); the peak memory is one "
                         "chunk's, so a few windows measure it, but then the time is not the pass's")
    ap.add_argument("--batch-size", type=int, default=None, help="windows per chunk (default: the config's)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args.error, args.threads, args.samples, args.batch_size)))
        return
    rows = []
    for name in args.models:
        cmd = [sys.executable, "-m", "experiments.bench.calibration", "--one", name, "--error", args.error,
               "--threads", str(args.threads), *(["--samples", str(args.samples)] if args.samples else []),
               *(["--batch-size", str(args.batch_size)] if args.batch_size else [])]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{name}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(lines[-1][len("RESULT "):]))
    print(f"{'model':<14} {'error':<6} {'layers':>6} {'tokens':>7} {'seconds':>8} {'target':>7} "
          f"{'stats MiB':>9} {'peak+ MiB':>9} {'fp32 MiB':>8} {'peak+/fp32':>10}")
    for r in rows:
        print(f"{r['model']:<14} {r['error']:<6} {r['layers']:>6} {r['tokens']:>7} {r['seconds']:>8.1f} "
              f"{r['target_seconds']:>7.0f} {r['statistics_bytes'] / 2**20:>9.1f} "
              f"{r['peak_extra_rss_bytes'] / 2**20:>9.1f} {r['fp32_model_bytes'] / 2**20:>8.1f} "
              f"{r['peak_extra_over_fp32_model']:>10.2f}")
    if rows and args.samples:
        print("(--samples given: the peak memory holds, the time is not the configured pass's; not written)")
    elif rows:
        from lowra.atomic import write_text_atomic

        OUT.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": f"CPU, {os.cpu_count()} cores (no GPU)", "note": "peak extra = sampled RSS "
                   "during the pass minus RSS before it; budget: ≤ 2× the fp32 model", "rows": rows}
        write_text_atomic(OUT, json.dumps(payload, indent=2) + "\n")
        print(f"wrote {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
