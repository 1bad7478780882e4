"""Pipeline benchmarks: ``python -m experiments.bench.pipeline [--only precision codebooks]``.

One function per section, ``bench_<name>(args) -> dict``, registered in ``SECTIONS``; each
section's dict is printed as a table and written to ``results/bench/<name>_cpu.json``.

**precision** (``bench_precision``): the two-stage ILP of :mod:`lowra.precision`.

1. Scale: error tables with the channel counts of Llama-2-7B (32 blocks: q, k, v, o of
   4096 x 4096, gate, up of 11008 x 4096, down of 4096 x 11008: 1,359,872 channels) and
   Llama-2-13B (40 blocks, hidden 5120, ffn 13824: 2,129,920 channels), SSE shaped like real
   ones (:func:`lowra.precision.synthetic_error_table`: Student-t rows, lognormal scales,
   measured Lloyd-Max distortions), at budgets 1.15, 1.5, 2, 2.5, 3.  Each case runs in a
   fresh interpreter: wall time per stage, gap to the LP lower bound, peak RSS of the process.
   Baselines in the same rows: the marginal-gain greedy, uniform bits (integer budgets), and
   the paper's cluster-mean stage-1 cost (``samples=0``) as an ablation; one per-matrix-budget
   row.
2. Small instances (1,728 channels, a miniature Llama block with 192 / 384 inputs): the
   two-stage plan against the exact flat ILP solved directly by HiGHS, over random seeds;
   the distribution of the excess over the optimum, also for the cluster-mean cost and for
   coarse clusters (8 per partition instead of 128, ~150 channels each).

``--quick`` runs 7B only, two budgets, five seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "results" / "bench"

MODELS = {  # name: (blocks, hidden, ffn)
    "llama2-7b": (32, 4096, 11008),
    "llama2-13b": (40, 5120, 13824),
}
BUDGETS = (1.15, 1.5, 2.0, 2.5, 3.0)
SMALL_SHAPE = (1, 192, 384)  # one block: 1,728 channels


# ------------------------------------------------------------------------------------------
# precision: one large case, in its own interpreter
# ------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def precision_case(model: str, budget: float, seed: int = 0, samples: int | None = None,
                   scope: str = "model", baselines: bool = True,
                   candidates: tuple[int, ...] = (1, 2, 4)) -> dict[str, Any]:
    """Solve one large instance and measure it.  Run in a fresh interpreter so that
    ``peak_rss`` (the process high-water mark, ``ru_maxrss``) belongs to this case alone."""
    import cvxpy  # noqa: F401  (import cost is not the solver's)

    from lowra.precision import (
        assign_precision,
        greedy_assignment,
        llama_layer_shapes,
        synthetic_error_table,
        uniform_assignment,
    )

    blocks, hidden, ffn = MODELS[model]
    candidates = tuple(candidates)
    e, n, sizes = synthetic_error_table(llama_layer_shapes(blocks, hidden, ffn), candidates,
                                        seed=seed)
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    plan = assign_precision(e, n, budget, candidates, seed=seed, samples=samples, scope=scope,
                            layer_sizes=sizes)
    wall = time.perf_counter() - t0
    stop.set()
    thread.join()
    row: dict[str, Any] = {
        "model": model, "channels": int(n.shape[0]), "budget": budget, "scope": scope,
        "samples": samples, "candidates": list(candidates), "seconds": wall, "times": plan.times,
        "average_bits": plan.average_bits, "objective": plan.objective,
        "lower_bound": plan.lower_bound, "gap": plan.gap,
        "budget_slack_channels": (budget * int(n.sum()) - int((n * plan.bits).sum()))
        / int(n.max()),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_extra_bytes": peak[0] - base, "table_bytes": int(e.nbytes + n.nbytes),
        "n_clusters": plan.n_clusters, "info": plan.summary()["info"], "solver": plan.solver,
    }
    if baselines:
        t0 = time.perf_counter()
        g = greedy_assignment(e, n, budget, candidates, scope=scope, layer_sizes=sizes)
        row["greedy_seconds"] = time.perf_counter() - t0
        cols = np.searchsorted(np.asarray(plan.candidates), g)
        row["greedy_gap"] = float(e[np.arange(e.shape[0]), cols].sum()) / plan.lower_bound - 1
        u = uniform_assignment(n, budget, candidates)
        if u is not None:
            j = plan.candidates.index(int(budget))
            row["uniform_gap"] = float(e[:, j].sum()) / plan.lower_bound - 1
    return row


def _in_subprocess(fn: str, **kwargs: Any) -> dict[str, Any]:
    code = ("import json, sys; from experiments.bench.pipeline import " + fn + " as f; "
            "print('@@' + json.dumps(f(**json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{fn}({kwargs}) failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("@@")][-1]
    return json.loads(line[2:])


# ------------------------------------------------------------------------------------------
# precision: small instances against the exact ILP
# ------------------------------------------------------------------------------------------
def small_instances(seeds: int, budgets: tuple[float, ...]) -> list[dict[str, Any]]:
    """Two-stage vs exact flat ILP (HiGHS, mip_rel_gap 0) on 1,728-channel instances."""
    from lowra.precision import (
        assign_precision,
        exact_assignment,
        greedy_assignment,
        llama_layer_shapes,
        synthetic_error_table,
    )

    shapes = llama_layer_shapes(*SMALL_SHAPE)
    rows = []
    for budget in budgets:
        for seed in range(seeds):
            e, n, sizes = synthetic_error_table(shapes, seed=1000 + seed)
            t0 = time.perf_counter()
            plan = assign_precision(e, n, budget, seed=seed, layer_sizes=sizes)
            t_two = time.perf_counter() - t0
            mean = assign_precision(e, n, budget, seed=seed, layer_sizes=sizes, samples=0)
            coarse = assign_precision(e, n, budget, seed=seed, layer_sizes=sizes, clusters=8)
            _, opt, info = exact_assignment(e, n, budget)
            g = greedy_assignment(e, n, budget)
            g_obj = float(e[np.arange(e.shape[0]), np.searchsorted([1, 2, 4], g)].sum())
            rows.append({
                "budget": budget, "seed": seed, "channels": int(n.shape[0]),
                "exact": opt, "exact_status": info["status"], "exact_seconds": info["time"],
                "two_stage": plan.objective, "two_stage_seconds": t_two,
                "excess": plan.objective / opt - 1, "mean_cost_excess": mean.objective / opt - 1,
                "coarse_excess": coarse.objective / opt - 1,
                "greedy_excess": g_obj / opt - 1, "lower_bound": plan.lower_bound,
                "exact_gap_to_lb": opt / plan.lower_bound - 1,
            })
    return rows


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"min": float(a.min()), "median": float(np.median(a)),
            "p95": float(np.quantile(a, 0.95)), "max": float(a.max()), "mean": float(a.mean())}


# ------------------------------------------------------------------------------------------
# precision: the section
# ------------------------------------------------------------------------------------------
def bench_precision(args: argparse.Namespace) -> dict[str, Any]:
    """Section ``precision``: large-instance table and small-instance comparison."""
    quick = bool(getattr(args, "quick", False))
    models = ["llama2-7b"] if quick else list(MODELS)
    budgets = (1.15, 2.0) if quick else BUDGETS
    seeds = 5 if quick else int(getattr(args, "seeds", 20))

    large = []
    print(f"\nPrecision plan, two-stage ILP (CVXPY + HiGHS), CPU with {os.cpu_count()} cores; "
          "each case in a fresh process")
    head = (f"{'model':>10} {'channels':>9} {'budget':>6} {'scope':>6} {'avg bits':>9} "
            f"{'total s':>8} {'clust':>6} {'bound':>6} {'stage1':>7} {'stage2':>7} "
            f"{'gap LB %':>9} {'peak MiB':>9} {'greedy %':>9} {'uniform %':>9}")
    print(head)

    def show(r: dict[str, Any]) -> None:
        t = r["times"]
        uni = f"{100 * r['uniform_gap']:>9.4f}" if "uniform_gap" in r else f"{'-':>9}"
        gr = f"{100 * r['greedy_gap']:>9.5f}" if "greedy_gap" in r else f"{'-':>9}"
        tag = r["scope"] if r["samples"] is None else f"s={r['samples']}"
        if r["candidates"] != [1, 2, 4]:
            tag = "".join(map(str, r["candidates"]))
        print(f"{r['model']:>10} {r['channels']:>9} {r['budget']:>6} {tag:>6} "
              f"{r['average_bits']:>9.6f} {r['seconds']:>8.2f} {t['cluster']:>6.2f} "
              f"{t['bound']:>6.2f} {t['stage1']:>7.2f} {t['stage2']:>7.2f} "
              f"{100 * r['gap']:>9.5f} {r['peak_rss_bytes'] / 2**20:>9.0f} {gr} {uni}",
              flush=True)

    for model in models:
        for budget in budgets:
            r = _in_subprocess("precision_case", model=model, budget=budget)
            large.append(r)
            show(r)
    ablation = []
    if not quick:
        print("\nAblation, Llama-2-7B: stage-1 cost = cluster mean x count (paper, samples=0),"
              " the per-matrix budget scope, candidates {1,2,3,4}")
        print(head)
        for budget in budgets:
            r = _in_subprocess("precision_case", model="llama2-7b", budget=budget, samples=0,
                               baselines=False)
            ablation.append(r)
            show(r)
        r = _in_subprocess("precision_case", model="llama2-7b", budget=1.5, scope="matrix")
        ablation.append(r)
        show(r)
        for budget in (1.5, 2.5):
            r = _in_subprocess("precision_case", model="llama2-7b", budget=budget,
                               candidates=[1, 2, 3, 4])
            ablation.append(r)
            show(r)

    from lowra.precision import llama_layer_shapes

    n_small = sum(r for r, _ in llama_layer_shapes(*SMALL_SHAPE))
    print(f"\nSmall instances ({n_small} channels): two-stage vs the "
          f"exact flat ILP (HiGHS, mip_rel_gap=0), {seeds} seeds per budget")
    small = small_instances(seeds, budgets)
    by_budget = {}
    print(f"{'budget':>6} {'excess % median':>16} {'p95':>8} {'max':>8} {'mean-cost max %':>16} "
          f"{'8 clusters max %':>17} {'greedy max %':>13} {'exact s':>8} {'two-stage s':>12}")
    for budget in budgets:
        rs = [r for r in small if r["budget"] == budget]
        s = {"excess": _summary([r["excess"] for r in rs]),
             "mean_cost_excess": _summary([r["mean_cost_excess"] for r in rs]),
             "coarse_excess": _summary([r["coarse_excess"] for r in rs]),
             "greedy_excess": _summary([r["greedy_excess"] for r in rs]),
             "exact_seconds": _summary([r["exact_seconds"] for r in rs]),
             "two_stage_seconds": _summary([r["two_stage_seconds"] for r in rs])}
        by_budget[str(budget)] = s
        print(f"{budget:>6} {100 * s['excess']['median']:>16.4f} {100 * s['excess']['p95']:>8.4f} "
              f"{100 * s['excess']['max']:>8.4f} {100 * s['mean_cost_excess']['max']:>16.4f} "
              f"{100 * s['coarse_excess']['max']:>17.4f} "
              f"{100 * s['greedy_excess']['max']:>13.4f} {s['exact_seconds']['median']:>8.2f} "
              f"{s['two_stage_seconds']['median']:>12.2f}")
    all_excess = _summary([r["excess"] for r in small])
    print(f"all {len(small)} instances: excess over the exact optimum median "
          f"{100 * all_excess['median']:.4f} %, max {100 * all_excess['max']:.4f} % "
          "(target <= 0.5 %)")

    from importlib.metadata import version

    import cvxpy
    import highspy  # noqa: F401

    return {
        "section": "precision", "device": "cpu", "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
        "numpy": np.__version__, "cvxpy": cvxpy.__version__, "highspy": version("highspy"),
        "load_average_at_end": list(os.getloadavg()), "quick": quick,
        "targets": {"llama2-7b_seconds": 60, "llama2-13b_seconds": 120, "peak_rss_gib": 4,
                    "gap_at_7b": 1e-3, "small_excess": 5e-3},
        "large": large, "ablation": ablation, "small": small, "small_summary": by_budget,
        "small_excess_all": all_excess,
    }


def bench_codebooks(args: argparse.Namespace) -> dict[str, Any]:
    """Section ``codebooks``: delegated to :mod:`experiments.bench.codebooks`."""
    from experiments.bench.codebooks import bench_codebooks as run

    return run(args)


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "precision": bench_precision,
    "codebooks": bench_codebooks,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="sections to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="precision: 7B only, two budgets, five small seeds")
    parser.add_argument("--seeds", type=int, default=20,
                        help="precision: random seeds per budget for the small instances")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        t0 = time.perf_counter()
        result = SECTIONS[name](args)
        result["bench_seconds"] = time.perf_counter() - t0
        out = args.out_dir / f"{name}_cpu.json"
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
