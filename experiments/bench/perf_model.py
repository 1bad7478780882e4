"""Fit and validate the kernel performance model (``lowra_kernels.perf_model``) on the H200 measurements.

``python -m experiments.bench.perf_model [--features] [--jobs N]``

Data (``results/bench/h200``): the GEMV sweep (``gpu_sweep.json``: 4096×11008, bf16, M = 1,
40 BLOCK_N × SPLIT_K × warps configs per width, graph replay of one weight — its codes stay in L2)
and the dequantize configs (``gpu_profile_before.json`` and ``after_gpu_profile_after.json``:
4 configs per width, the geometric mean where both runs measured one; the 90 MB output streams to
HBM). The kernel bodies measured there are the ones in ``kernels/`` today (unchanged since).

``--features`` compiles every measured config for sm_90 (``lowra_kernels.compile_check``, SASS
statistics) and writes ``results/bench/perf_model_features.json``; without it the committed features
are read, so a refit needs no compiler. Then: the model is fitted to all points, validated by
leave-one-out (each point predicted by the model fitted to the others), scored per kernel and width
(Spearman, median and max relative error, whether the predicted-best config is within 10 % of the
measured best), and the measured configs are predicted on an H100 by swapping the peaks. Writes
``results/bench/perf_model_fit.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
H200_DIR = REPO / "results" / "bench" / "h200"
FEATURES = REPO / "results" / "bench" / "perf_model_features.json"
OUT = REPO / "results" / "bench" / "perf_model_fit.json"
OUT_FEATURES, IN_FEATURES, GROUP = 4096, 11008, 64
ACCEPT = {"spearman": 0.8, "median_rel_err": 0.25}


def measurements(h200_dir: Path = H200_DIR) -> list[dict]:
    """Measured points: ``{"kernel", "bits", "config", "num_warps", "us"}``."""
    sweep = json.loads((h200_dir / "gpu_sweep.json").read_text())
    pts = [{"kernel": "lut_gemv", "bits": r["bits"], "config": {"BLOCK_N": r["BLOCK_N"], "SPLIT_K": r["SPLIT_K"]},
            "num_warps": r["num_warps"], "us": r["graph_us"]}
           for r in sweep["gemv_sweep"] if r["m"] == 1 and r["graph_us"]]
    deq: dict[tuple, list[float]] = {}
    for name in ("gpu_profile_before.json", "after_gpu_profile_after.json"):
        for row in json.loads((h200_dir / name).read_text())["rows"]:
            for c in row.get("configs", []):
                if c["graph_us"]:
                    cfg = c["config"]
                    key = (row["bits"], cfg["BLOCK_R"], cfg["STEPS"], cfg["num_warps"])
                    deq.setdefault(key, []).append(c["graph_us"])
    for (bits, br, steps, nw), us in sorted(deq.items()):
        pts.append({"kernel": "dequantize", "bits": bits, "config": {"BLOCK_R": br, "STEPS": steps},
                    "num_warps": nw, "us": math.exp(sum(map(math.log, us)) / len(us))})
    return pts


def variant(p: dict) -> dict:
    """The ``compile_check`` variant (sm_90, bf16) of a measured point."""
    extra = {"BLOCK_M": 1} if p["kernel"] in ("lut_gemv", "gemv_v2") else {}
    stages = 1 if p["kernel"].endswith("_v2") else 2
    maxnreg = 96 if p["kernel"] == "gemv_v2" else None  # gemv_v2.GEMV_V2_MAXNREG
    return {"kernel": p["kernel"], "arch": 90, "bits": p["bits"], "dtype": "bfloat16", "extra": extra,
            "config_index": -1, "config": p["config"], "num_warps": p["num_warps"], "num_stages": stages,
            "maxnreg": maxnreg}


def v2_points() -> list[dict]:
    """The v2 kernels at their shipped config per width (no measurement: predicted only)."""
    from lowra_kernels.dequantize_v2 import DEQUANT_V2_CONFIG
    from lowra_kernels.gemv_v2 import GEMV_V2_CONFIG

    pts = []
    for bits in (1, 2, 3, 4):
        block_n, warps = GEMV_V2_CONFIG[bits]
        pts.append({"kernel": "gemv_v2", "bits": bits, "config": {"BLOCK_N": block_n}, "num_warps": warps})
        block_r, tiles, warps = DEQUANT_V2_CONFIG[bits]
        pts.append({"kernel": "dequantize_v2", "bits": bits, "config": {"BLOCK_R": block_r, "TILES": tiles},
                    "num_warps": warps})
    return pts


def point_key(kernel: str, bits: int, config: dict, num_warps: int) -> str:
    return json.dumps([kernel, bits, config, num_warps], sort_keys=True)


def build_features(points: list[dict], jobs: int, path: Path = FEATURES) -> dict[str, dict]:
    """Compile (or take from ``path``'s recorded results of equal input hash) every point's binary."""
    from lowra.atomic import write_text_atomic
    from lowra_kernels.compile_check import compile_all

    todo = [variant(p) for p in points]
    from lowra_kernels.compile_check import DEFAULT_OUT

    results = compile_all(todo, jobs, sass=True, cache=[path, DEFAULT_OUT])  # make kernels-compile's records too
    bad = [r for r in results if not r.get("ok")]
    if bad:
        raise RuntimeError(f"{len(bad)} measured configs failed to compile: {bad[0].get('error')}")
    keep = ("kernel", "arch", "bits", "dtype", "extra", "config", "num_warps", "num_stages", "maxnreg", "registers",
            "shared_bytes", "spill_bytes", "sass", "input_hash", "ok")
    rows = [{k: r[k] for k in keep} for r in results]
    import triton

    write_text_atomic(path, json.dumps({"triton": triton.__version__, "arch": 90, "results": rows}, indent=1))
    return load_features(path)


def load_features(path: Path = FEATURES) -> dict[str, dict]:
    rows = json.loads(path.read_text())["results"]
    return {point_key(r["kernel"], r["bits"], r["config"], r["num_warps"]): r for r in rows}


def launch(p: dict, feat: dict) -> Any:
    """The ``perf_model.Launch`` of a measured point (4096×11008, group 64, one bit-width)."""
    from lowra_kernels.layout import num_groups, words_per_row
    from lowra_kernels.lut import dequant_step, gemv_step
    from lowra_kernels.perf_model import Launch, Sass

    if p["kernel"].endswith("_v2"):
        return launch_v2(p, feat)
    bits, cfg, n, k = p["bits"], p["config"], OUT_FEATURES, IN_FEATURES
    n_words, groups = words_per_row(k, bits), num_groups(k, GROUP)
    gemv = p["kernel"] == "lut_gemv"
    sass = Sass.from_stats(feat["registers"], feat["shared_bytes"], feat["sass"], has_loop=gemv)
    codes, scales, codebook = n * n_words * 4, n * groups * 2, n * (1 << bits) * 2
    if gemv:
        words = gemv_step(bits, GROUP)[0]
        row_blocks = math.ceil(n / cfg["BLOCK_N"])
        grid = row_blocks * cfg["SPLIT_K"]
        trips = math.ceil(math.ceil(n_words / words) / cfg["SPLIT_K"])
        x_bytes = row_blocks * k * 2  # every row block reads all of x (its K slices over the split)
        nbytes = codes + scales + codebook + x_bytes + cfg["SPLIT_K"] * n * 4
        ways = table_conflicts(bits, *gemv_step(bits, GROUP), cfg["BLOCK_N"])
        return Launch(grid=grid, warps=p["num_warps"], trips=trips, bytes=nbytes, resident=True, sass=sass,
                      smem_ways=ways)
    words = dequant_step(bits, GROUP)[0]
    grid = math.ceil(n / cfg["BLOCK_R"]) * math.ceil(n_words / (words * cfg["STEPS"]))
    nbytes = codes + scales + codebook + n * k * 2
    return Launch(grid=grid, warps=p["num_warps"], trips=0, bytes=nbytes, resident=False, sass=sass,
                  smem_ways=table_conflicts(bits, *dequant_step(bits, GROUP), cfg["BLOCK_R"]))


def table_conflicts(bits: int, words: int, pw2: int, aligned: bool, rows: int) -> float:
    """Bank-conflict ways of the v1 kernels' 3/4-bit gathers: each row's table (``NG · 2^bits`` fp32
    entries) starts at a multiple of its size, so rows whose tables start on the same bank collide
    for equal codes — ``min(rows, 32) · table / 32`` ways (1 for the 1/2-bit select trees)."""
    from lowra_kernels.lut import gather_groups

    ng = gather_groups(bits, words, aligned, GROUP)
    if not ng:
        return 1.0
    return max(1.0, min(rows, 32) * ng * (1 << bits) / 32)


def launch_v2(p: dict, feat: dict, resident: bool = False) -> Any:
    """The ``Launch`` of a v2 kernel on the representative layer, codes streamed from HBM (a decode
    step reads each layer's weight once; ``resident=True``: replayed from L2 like the H200 sweep)."""
    from lowra_kernels.gemv_v2 import gemv_v2_launch_shape, gemv_v2_step_tiles
    from lowra_kernels.layout import num_groups
    from lowra_kernels.layout_v2 import TILE, tile_words
    from lowra_kernels.perf_model import Launch, Sass

    bits, cfg, n, k = p["bits"], p["config"], OUT_FEATURES, IN_FEATURES
    tiles, groups = math.ceil(k / TILE), num_groups(k, GROUP)
    codes, scales, codebook = tiles * n * tile_words(bits) * 4, groups * n * 2, n * (1 << bits) * 2
    if p["kernel"] == "gemv_v2":
        sass = Sass.from_stats(feat["registers"], feat["shared_bytes"], feat["sass"], has_loop=True)
        block_n, _, split, per = gemv_v2_launch_shape(n, tiles, bits)
        row_blocks = math.ceil(n / block_n)
        nbytes = codes + scales + codebook + row_blocks * k * 2 + split * n * 4
        return Launch(grid=row_blocks * split, warps=p["num_warps"], trips=math.ceil(per / gemv_v2_step_tiles(bits)),
                      bytes=nbytes, resident=resident, sass=sass)
    sass = Sass.from_stats(feat["registers"], feat["shared_bytes"], feat["sass"], has_loop=False)
    grid = math.ceil(n / cfg["BLOCK_R"]) * math.ceil(tiles / cfg["TILES"])
    return Launch(grid=grid, warps=p["num_warps"], trips=0, bytes=codes + scales + codebook + n * k * 2,
                  resident=False, sass=sass)


def linear_bf16_us(gpu: Any) -> float:
    """``F.linear`` bf16 at M = 1 on the representative layer: its weight bytes at the bandwidth cuBLAS
    reached on the H200 (25.0 µs for 90.2 MB, ``after_gpu_profile_after.json``), swapped to ``gpu``'s
    HBM peak — an estimate, not from the SASS model (cuBLAS has no SASS here)."""
    from lowra_kernels.perf_model import H200

    return H200_LINEAR_US * H200.hbm_gbps / gpu.hbm_gbps


H200_LINEAR_US = 24.98  # after_gpu_profile_after.json: bf16 F.linear M=1 kernels (nvjet + splitK reduce)


def v2_estimates(consts: Any, feats: dict[str, dict], loo_err: dict[str, float]) -> list[dict]:
    """H100 (and H200) predictions of the v2 kernels and, for comparison, of the v1 GEMV's best
    measured config from HBM; each with the model's leave-one-out median error of that kernel family."""
    from lowra_kernels import perf_model as pm

    rows = []
    for p in v2_points():
        f = feats.get(point_key(p["kernel"], p["bits"], p["config"], p["num_warps"]))
        if f is None:
            continue
        la = launch_v2(p, f)
        fam = "lut_gemv" if p["kernel"] == "gemv_v2" else "dequantize"
        err = loo_err.get(f"{fam} {p['bits']}b")
        row = {"kernel": p["kernel"], "bits": p["bits"], "config": p["config"], "num_warps": p["num_warps"],
               "registers": f["registers"], "model_loo_median_rel_err": err}
        for name, gpu in (("h100", pm.H100), ("h200", pm.H200)):
            t = pm.terms(la, gpu, consts)
            row[f"{name}_us"] = t["us"]
            if p["kernel"] == "gemv_v2":
                row[f"{name}_x_linear_bf16"] = linear_bf16_us(gpu) / t["us"]
            else:
                row[f"{name}_pct_hbm"] = 100 * la.bytes / t["us"] / 1e3 / gpu.hbm_gbps
        rows.append(row)
    return rows


def v1_from_hbm(points: list[dict], launches: list, consts: Any) -> dict[str, dict]:
    """The v1 GEMV's best measured config per width, predicted on an H100 with its codes streamed from
    HBM (the sweep replayed one weight from L2): the baseline the v2 estimates compare with."""
    from dataclasses import replace

    from lowra_kernels import perf_model as pm

    out = {}
    for bits in (1, 2, 3, 4):
        idx = [i for i, p in enumerate(points) if p["kernel"] == "lut_gemv" and p["bits"] == bits]
        if idx:
            best = min(idx, key=lambda i: points[i]["us"])
            us = pm.predict(replace(launches[best], resident=False), pm.H100, consts)
            out[f"{bits}b"] = {"config": points[best]["config"], "num_warps": points[best]["num_warps"],
                               "h100_us": us, "x_linear_bf16": linear_bf16_us(pm.H100) / us}
    return out


def evaluate(points: list[dict], launches: list, gpu_name: str = "H200") -> dict:
    """Fit, leave-one-out, scores per kernel and width, H100 predictions."""
    from lowra_kernels import perf_model as pm

    meas = [p["us"] for p in points]
    # each kernel family weighs the same in the fit (160 GEMV points would drown 16 dequantize ones)
    fam = {k: sum(q["kernel"] == k for q in points) for k in {q["kernel"] for q in points}}
    weights = [len(points) / (len(fam) * fam[p["kernel"]]) for p in points]
    c = pm.fit(launches, meas, pm.GPUS[gpu_name], weights=weights)
    fitted = pm.predict_many(launches, pm.GPUS[gpu_name], c)
    loo = pm.leave_one_out(launches, meas, pm.GPUS[gpu_name], c, weights=weights)
    h100 = pm.predict_many(launches, pm.H100, c)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(points):
        groups.setdefault(f"{p['kernel']} {p['bits']}b", []).append(i)
    per = {}
    for name, idx in groups.items():
        s = pm.scores([loo[i] for i in idx], [meas[i] for i in idx])
        s["fit_median_rel_err"] = float(sorted(abs(fitted[i] - meas[i]) / meas[i] for i in idx)[len(idx) // 2])
        s["accepted"] = bool(s["spearman"] >= ACCEPT["spearman"] - 1e-9  # 4 points: exactly 0.8 in floats
                             and s["median_rel_err"] <= ACCEPT["median_rel_err"] and s["top_within_10pct"])
        best = min(idx, key=lambda i: meas[i])
        s["best_config"] = {"config": points[best]["config"], "num_warps": points[best]["num_warps"]}
        s["best_h100_predicted_us"] = float(h100[best])
        per[name] = s
    rows = [dict(p, fitted_us=float(fitted[i]), loo_us=float(loo[i]), h100_us=float(h100[i]),
                 terms=pm.terms(launches[i], pm.GPUS[gpu_name], c)) for i, p in enumerate(points)]
    overall = pm.scores(loo, meas)
    return {"constants": pm.constants_dict(c), "gpu": gpu_name, "per_kernel_width": per, "overall_loo": overall,
            "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", action="store_true", help="compile the measured configs (sm_90 SASS)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    points = measurements()
    feats = build_features(points + v2_points(), args.jobs) if args.features else load_features()
    missing = [p for p in points if point_key(p["kernel"], p["bits"], p["config"], p["num_warps"]) not in feats]
    if missing:
        raise SystemExit(f"{len(missing)} measured configs have no features; run with --features")
    feat = {id(p): feats[point_key(p["kernel"], p["bits"], p["config"], p["num_warps"])] for p in points}
    spilling = [p for p in points if feat[id(p)]["spill_bytes"]]
    points = [p for p in points if p not in spilling]  # not shippable (compile_check rejects them); not modelled
    launches = [launch(p, feat[id(p)]) for p in points]
    report = evaluate(points, launches)
    report["excluded_spilling"] = spilling
    from lowra_kernels import perf_model as pm


    loo_err = {k: v["median_rel_err"] for k, v in report["per_kernel_width"].items()}
    consts = pm.Constants(**report["constants"])
    report["v2_estimates"] = v2_estimates(consts, feats, loo_err)
    report["v1_gemv_from_hbm_h100"] = v1_from_hbm(points, launches, consts)
    report["linear_bf16_us"] = {"h200_measured": H200_LINEAR_US, "h100_estimate": linear_bf16_us(pm.H100)}
    report.update(what="perf model fitted to H200 measurements; leave-one-out scores", accept=dict(
        ACCEPT, top_within_10pct=True), peaks={n: dict(vars(g), l2_gbps=g.l2_gbps) for n, g in pm.GPUS.items()},
        features=str(FEATURES.relative_to(REPO)))
    from lowra.atomic import write_text_atomic

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(report, indent=1))
    print("constants: " + ", ".join(f"{k}={v:.3g}" for k, v in report["constants"].items()))
    print(f"{'kernel width':<16} {'n':>3} {'spearman':>8} {'median err':>10} {'max err':>8} {'top ≤10%':>8} "
          f"{'best µs':>8} {'best H100 est µs':>16} {'accepted':>8}")
    for name, s in report["per_kernel_width"].items():
        print(f"{name:<16} {s['n']:>3} {s['spearman']:>8.2f} {s['median_rel_err']:>10.1%} {s['max_rel_err']:>8.1%} "
              f"{str(s['top_within_10pct']):>8} {s['best_measured_us']:>8.1f} {s['best_h100_predicted_us']:>16.1f} "
              f"{str(s['accepted']):>8}")
    print(f"ESTIMATES (model, H100 peaks; F.linear bf16 M=1 {report['linear_bf16_us']['h100_estimate']:.1f} µs):")
    for r in report["v2_estimates"]:
        extra = (f"{r['h100_x_linear_bf16']:.2f}× F.linear" if "h100_x_linear_bf16" in r
                 else f"{r['h100_pct_hbm']:.0f} % of HBM")
        err = r["model_loo_median_rel_err"]
        print(f"  {r['kernel']:<14} {r['bits']}b {r['h100_us']:7.1f} µs  {extra}  (model median error "
              f"{'-' if err is None else f'{err:.0%}'})")
    print("  v1 GEMV (best measured config) from HBM on an H100: " + ", ".join(
        f"{b} {r['h100_us']:.1f} µs ({r['x_linear_bf16']:.2f}×)" for b, r in report["v1_gemv_from_hbm_h100"].items()))
    o = report["overall_loo"]
    print(f"all {o['n']} points, leave-one-out: Spearman {o['spearman']:.2f}, median error "
          f"{o['median_rel_err']:.1%}, max {o['max_rel_err']:.1%}; wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
