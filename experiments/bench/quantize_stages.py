"""Time and peak host memory of each sub-stage of ``quantize_model`` on a model the runner builds.

The model, the calibration windows and the ``LowRAConfig`` are built exactly as ``python -m
experiments.run`` builds them (Hydra config ``run`` with the given overrides; default: SmolLM2-135M,
the default ``quant=lowra`` at 2 bits), then ``lowra.quantize_model`` runs with its named stages
(``lowra.pipeline``: calibrate, error tables = codebooks + K-FAC rows, plan; ``quantize_layers``: quantize
+ pack + adapter init) each wrapped in a :class:`lowra.streaming.PeakMemory` stage: wall time and the
peak resident set (VmHWM, reset at each stage's start) of every sub-stage, beside the sub-stage
times of the report (``report.times``: ``quantize_s`` / ``loftq_s`` split stage 6 into the
quantizer calls and the init). One case per interpreter (``--one``), so an earlier case's
allocations never hide in the allocator.

    python -m experiments.bench.quantize_stages                    # SmolLM2-135M, quant=lowra, 2 bits
    python -m experiments.bench.quantize_stages --overrides +model=smollm2_135m +bits=2 quant.init=loftq
    python -m experiments.bench.quantize_stages --profile calibrate   # cProfile of one stage (top 30)

Writes ``results/bench/quantize_stages_cpu.json`` (``--json`` elsewhere) and prints a table.
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
OUT = REPO / "results" / "bench" / "quantize_stages_cpu.json"
DEFAULT_OVERRIDES = ("+model=smollm2_135m", "+bits=2")
#: the stages wrapped, as (module, attribute, row name)
WRAPPED = (("lowra.pipeline", "calibrate", "calibrate"),
           ("lowra.pipeline", "error_tables", "codebooks + error tables"),
           ("lowra.pipeline", "plan_precision", "plan"),
           ("lowra.model_quantization", "quantize_layers", "quantize + init"))


def _load_uptime() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _wrap(peaks: Any, profile: str | None, name: str, fn: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if profile == name:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            with peaks.stage(name):
                out = prof.runcall(fn, *args, **kwargs)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)
            return out
        with peaks.stage(name):
            return fn(*args, **kwargs)
    return wrapped


def measure(overrides: list[str], threads: int, profile: str | None = None) -> dict[str, Any]:
    """One case in this interpreter: load as the runner does, then ``quantize_model`` with its stages wrapped."""
    import importlib

    import torch
    from hydra import compose, initialize_config_dir

    from experiments.bench.quantize_floor import floor, with_init_iters
    from experiments.runner.config_check import CONF_DIR
    from experiments.runner.data import load_data
    from experiments.runner.setup import calibration_kwargs, load_model, load_tokenizer, lowra_config
    from lowra.model_quantization import quantize_model
    from lowra.pipeline import find_targets, resolve_settings
    from lowra.streaming import PeakMemory, current_rss

    torch.set_num_threads(threads)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=list(overrides))
    tokenizer = load_tokenizer(cfg.model)
    data = load_data(cfg.data, tokenizer, need_train=True)
    model = load_model(cfg.model, torch.device("cpu"))
    calib = calibration_kwargs(cfg, data)
    with torch.no_grad():  # page the (memory-mapped) weights in: they are the model, not the stages' memory
        model(input_ids=calib["calibration"][:1])
    rss_loaded = current_rss()
    config = lowra_config(cfg)
    settings = resolve_settings(config, progress=False)
    targets = [name for name, _ in find_targets(model, settings)]
    per_iter = floor(model, targets, calib["calibration"], tuple(settings.candidates), threads, config.rank,
                     settings.codebook_iters, settings.group_size)
    peaks = PeakMemory()
    for module, attr, name in WRAPPED:
        mod = importlib.import_module(module)
        setattr(mod, attr, _wrap(peaks, profile, name, getattr(mod, attr)))
    load0 = _load_uptime()
    t0 = time.perf_counter()
    report = quantize_model(model, config, progress=True, **calib)
    total = time.perf_counter() - t0
    with_init_iters(per_iter, report.loftq_iters)
    return {
        "overrides": list(overrides), "threads": threads, "load_before": load0, "load_after": _load_uptime(),
        "rss_loaded_bytes": rss_loaded, "total_s": round(total, 2),
        "stages": {k: {"time_s": round(v["time_s"], 2), "peak_rss_bytes": v["peak_rss_bytes"]}
                   for k, v in peaks.stages.items()},
        "process_peak_rss_bytes": peaks.to_dict()["process_peak_rss_bytes"],
        "report_times": {k: round(float(v), 2) for k, v in report.times.items()},
        "bits_nominal": report.bits_nominal, "total_sse": report.total_sse,
        "floor": per_iter,
    }


def table(r: dict[str, Any]) -> str:
    lines = [f"{' '.join(r['overrides'])} — {r['threads']} threads, "
             f"load {r['load_before']:.2f} → {r['load_after']:.2f}",
             f"{'stage':<26} {'seconds':>8} {'peak RSS GB':>11} {'floor s':>8} {'x floor':>7}"]
    floors = r.get("floor", {}).get("stages", {})
    for name, v in r["stages"].items():
        f = floors.get(name)
        extra = f" {f['floor_s']:>8.1f} {v['time_s'] / f['floor_s']:>7.2f}" if f and f["floor_s"] > 0 else ""
        lines.append(f"{name:<26} {v['time_s']:>8.1f} {v['peak_rss_bytes'] / 1e9:>11.2f}{extra}")
    lines.append(f"{'quantize_model total':<26} {r['total_s']:>8.1f} {r['process_peak_rss_bytes'] / 1e9:>11.2f}")
    lines.append("report.times: " + ", ".join(f"{k} {v:.1f}" for k, v in r["report_times"].items()))
    if r.get("floor"):
        fl = r["floor"]
        st = fl["stages"]
        lines.append(f"floor = GEMM work at {fl['gemm_gflops']} GFLOP/s (fp32, measured here, {fl['threads']} "
                     "threads) + "
                     f"timed components: Lloyd-Max {st['codebooks + error tables']['lloyd_s']:.1f} s, init "
                     f"factorizations {st['quantize + init']['factors_s']:.1f} s; {fl['calibration_tokens']} "
                     f"calibration tokens, {fl['init_iters']} init iteration(s)")
    lines.append(f"RSS after load {r['rss_loaded_bytes'] / 1e9:.2f} GB; bits {r['bits_nominal']:.3f}, "
                 f"total SSE after init {r['total_sse']:.6g}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--overrides", nargs="*", default=list(DEFAULT_OVERRIDES))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--profile", choices=[n for *_, n in WRAPPED], help="cProfile this stage (stderr)")
    ap.add_argument("--json", type=Path, default=OUT)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: this interpreter
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.overrides, args.threads, args.profile)), flush=True)
        return
    cmd = [sys.executable, "-m", "experiments.bench.quantize_stages", "--one", "--threads", str(args.threads),
           *(["--profile", args.profile] if args.profile else []), "--overrides", *args.overrides]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"failed (exit {proc.returncode})")
    row = json.loads(lines[-1][len("RESULT "):])
    print(table(row))
    from lowra.atomic import write_text_atomic

    args.json.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(args.json.read_text())["rows"] if args.json.exists() else []
    rows = [r for r in rows if r["overrides"] != row["overrides"]] + [row]
    write_text_atomic(args.json, json.dumps({"machine": f"CPU, {os.cpu_count()} cores (shared; load in each row)",
                                             "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json.relative_to(REPO) if args.json.is_relative_to(REPO) else args.json}")


if __name__ == "__main__":
    main()
