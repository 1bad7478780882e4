"""Held-out ppl after fine-tuning with trainable vs frozen codebooks: collects runner results.

Each run is one runner call (``python -m experiments.run +bits=1.15 train.max_steps=100 logger=none
progress=false eval.max_tokens=8192 save_model=false seed=S train.codebooks=MODE
hydra.run.dir=RUNS/sS_MODE``); this reads ``RUNS/s<seed>_<mode>/results.json`` for every seed and
mode, writes ``results/bench/trainable_tables_ppl.json`` and prints a table (per seed and the mean,
with the fine-tune stage's wall time and peak memory as the runner recorded them).

    .venv/bin/python -m experiments.bench.trainable_tables_ppl --runs /tmp/wt31b-runs --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MODES = ("frozen", "trainable")
KEYS = ("ppl_fp", "ppl_quantized", "ppl_loftq", "ppl_finetuned", "train_time_s", "bits_nominal", "bits_effective",
        "trainable_params", "peak_memory_bytes", "train_steps")


def collect(runs: Path, seeds: list[int], modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    """``{mode: {seed: {key: value}}}`` from the runs' ``results.json`` (a missing run is an error)."""
    out: dict[str, Any] = {}
    for mode in modes:
        out[mode] = {}
        for s in seeds:
            path = runs / f"s{s}_{mode}" / "results.json"
            if not path.exists():
                raise FileNotFoundError(f"no results.json for seed {s}, codebooks {mode}: {path}")
            res = json.loads(path.read_text())
            if res["config"]["train"].get("codebooks", "frozen") != mode:
                raise ValueError(f"{path} ran train.codebooks={res['config']['train'].get('codebooks')}, not {mode}")
            out[mode][str(s)] = {k: res.get(k) for k in KEYS}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "trainable_tables_ppl.json")
    args = ap.parse_args(argv)
    rows = collect(args.runs, args.seeds)
    mean = {m: statistics.mean(r["ppl_finetuned"] for r in rows[m].values()) for m in MODES}
    from experiments.runner.logging_utils import atomic_write_json

    atomic_write_json(args.out, {"bits": 1.15, "steps": 100, "seeds": args.seeds, "runs": rows,
                                 "mean_ppl_finetuned": mean, "machine": "shared 2-core CPU"})
    print("| seed | frozen ppl | trainable ppl | trainable / frozen | frozen train s | trainable train s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for s in map(str, args.seeds):
        f, t = rows["frozen"][s], rows["trainable"][s]
        print(f"| {s} | {f['ppl_finetuned']:.2f} | {t['ppl_finetuned']:.2f} | "
              f"{t['ppl_finetuned'] / f['ppl_finetuned']:.3f} | {f['train_time_s']:.0f} | {t['train_time_s']:.0f} |")
    print(f"| mean | {mean['frozen']:.2f} | {mean['trainable']:.2f} | {mean['trainable'] / mean['frozen']:.3f} | | |")


if __name__ == "__main__":
    main()
