"""Aggregate the stories260K sweep: ``python -m experiments.studies.collect_results [--runs results/runs]``.

Reads every ``results.json`` under ``--runs`` (the run directories of ``results/reproduce.sh``,
one Hydra multirun per sweep / ablation) and writes

* ``results/stories260k_sweep.csv`` / ``.json`` — one row per run, with the command that made it
  (rebuilt from the run's ``.hydra/overrides.yaml``);
* ``results/pareto_bits_vs_ppl.png`` — fine-tuned held-out perplexity vs nominal and effective
  bits per method (mean ± std over seeds);
* ``results/bit_allocation.png`` — LowRA's rows per bit-width by layer type at 1.15 / 2 / 3 bits;
* ``results/ablations.png`` — the LowRA ablations at 2 bits;
* ``results/stories260k_tables.md`` — the markdown tables (also printed).

Out-of-domain perplexity: the runner evaluates the held-out TinyStories only, so each run's saved
model (``<run>/model``, ``lowra.load_quantized``) is evaluated here on the local WikiText-2 raw test
file with the runner's own ``experiments.eval.evaluate.perplexity`` and the run's eval windows
(cached in ``<run>/wikitext2_eval.json``; ``--no-wikitext`` skips it).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
#: overrides shared by every run of the sweep (not part of a run's variant label)
COMMON_KEYS = {"logger", "progress", "train.max_steps", "eval.max_tokens", "quant", "+bits", "bits", "seed",
               "+quant.options.plan_options.time_limit"}  # an ILP wall-time cap, not an ablation
COLUMNS = [
    "group", "method", "variant", "bits_target", "seed", "bits_nominal", "bits_effective",
    "ppl_fp", "ppl_quantized", "ppl_loftq", "ppl_finetuned", "wikitext2_ppl_fp", "wikitext2_ppl_finetuned",
    "weight_sse", "model_bytes", "training_bytes", "peak_memory_bytes", "quantize_time_s", "train_time_s",
    "wall_time_s", "train_steps", "rank", "eval_tokens", "run_dir", "command",
]
#: the sweep's LowRA runs: quant=lowra_paper today (the paper preset; it was quant=lowra when the
#: committed tables were made)
LOWRA_NAMES = ("lowra", "lowra_paper")
VARIANT_NAMES = {
    "": "LowRA (default)",
    "+quant.options.use_plan=false": "uniform bits (no ILP plan)",
    "+quant.options.use_plan=False": "uniform bits (no ILP plan)",
    "quant.loftq_iters=0": "no LoftQ (B = 0 init)",
    "+quant.options.weight_power=1": "weight_power = 1",
    "quant.candidates=[1,2,3,4]": "candidates {1,2,3,4}",
    "quant.codebook=nf": "NF codebooks (ILP plan on)",
}


# --------------------------------------------------------------------------------------- reading


def read_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    import yaml

    return [str(x) for x in yaml.safe_load(path.read_text()) or []]


def variant_of(overrides: list[str]) -> str:
    """The overrides that are not common to every run (the ablation), joined by spaces."""
    keys = [o for o in overrides if o.split("=", 1)[0] not in COMMON_KEYS]
    return " ".join(sorted(keys))


def command_of(run_dir: Path, overrides: list[str]) -> str:
    quoted = [f"'{o}'" if any(c in o for c in "[],") else o for o in overrides]
    try:
        where = run_dir.resolve().relative_to(REPO)
    except ValueError:
        where = run_dir
    return " ".join(["python -m experiments.run", *quoted, f"hydra.run.dir={where}"])


def row_of(run_dir: Path, runs_root: Path) -> dict[str, Any]:
    r = json.loads((run_dir / "results.json").read_text())
    report = {}
    if (run_dir / "quant_report.json").exists():
        report = json.loads((run_dir / "quant_report.json").read_text())
    overrides = read_overrides(run_dir)
    memory = r.get("memory") or {}
    wiki = {}
    if (run_dir / "wikitext2_eval.json").exists():
        wiki = json.loads((run_dir / "wikitext2_eval.json").read_text())
    rel = run_dir.relative_to(runs_root)
    return {
        "group": rel.parts[0] if len(rel.parts) > 1 else "",
        "method": r["method"],
        "variant": variant_of(overrides),
        "bits_target": r["bits_target"],
        "seed": r["seed"],
        "bits_nominal": r.get("bits_nominal"),
        "bits_effective": r.get("bits_effective"),
        "ppl_fp": r.get("ppl_fp"),
        "ppl_quantized": r.get("ppl_quantized"),
        "ppl_loftq": r.get("ppl_loftq"),
        "ppl_finetuned": r.get("ppl_finetuned"),
        "wikitext2_ppl_fp": wiki.get("ppl_fp"),
        "wikitext2_ppl_finetuned": wiki.get("ppl_finetuned"),
        "weight_sse": report.get("total_sse_quant"),
        "model_bytes": memory.get("model_total"),
        "training_bytes": memory.get("training_total"),
        "peak_memory_bytes": r.get("peak_memory_bytes"),
        "quantize_time_s": r.get("quantize_time_s"),
        "train_time_s": r.get("train_time_s"),
        "wall_time_s": r.get("wall_time_s"),
        "train_steps": r.get("train_steps"),
        "rank": r.get("rank"),
        "eval_tokens": (r.get("eval") or {}).get("max_tokens"),
        "run_dir": str(rel),
        "command": command_of(run_dir, overrides),
        "_bits_by_layer_type": r.get("bits_by_layer_type") or {},
    }


def find_runs(runs_root: Path) -> list[Path]:
    return sorted(p.parent for p in runs_root.rglob("results.json"))


# ------------------------------------------------------------------------------ WikiText-2 (OOD)


def wikitext_eval(run_dirs: list[Path], fp_cache: dict[str, float]) -> None:
    """Fine-tuned (saved) model of each run on the local WikiText-2 test file → wikitext2_eval.json."""
    import torch
    from omegaconf import OmegaConf

    import lowra
    from experiments.eval.evaluate import perplexity
    from experiments.runner.data import load_data
    from experiments.runner.setup import load_model, load_tokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data_cfg = OmegaConf.load(REPO / "conf" / "data" / "wikitext2.yaml")
    data_cfg.local.eval = data_cfg.local.eval_fallback  # the local raw test file (no Hub lookup)
    streams: dict[str, Any] = {}
    for run_dir in run_dirs:
        out = run_dir / "wikitext2_eval.json"
        if out.exists() or not lowra.is_checkpoint(run_dir / "model"):
            continue
        cfg = OmegaConf.create(json.loads((run_dir / "results.json").read_text())["config"])
        key = str(cfg.model.pretrained)
        if key not in streams:
            tokenizer = load_tokenizer(cfg.model)
            streams[key] = load_data(data_cfg, tokenizer, need_train=False)
        data = streams[key]
        e = cfg.eval
        kw = dict(window=int(e.window), stride=int(e.stride), max_tokens=e.max_tokens, batch_size=int(e.batch_size),
                  device="cpu", progress=False)
        if key not in fp_cache:
            fp_cache[key] = perplexity(load_model(cfg.model, torch.device("cpu")), data.eval_ids, **kw)["ppl"]
        model = lowra.load_quantized(str(run_dir / "model"), device="cpu")
        with torch.no_grad():
            ft = perplexity(model, data.eval_ids, **kw)
        out.write_text(json.dumps({"ppl_fp": fp_cache[key], "ppl_finetuned": ft["ppl"], "tokens": ft["tokens"],
                                   "source": data.sources["eval"], "window": kw["window"],
                                   "max_tokens": kw["max_tokens"]}, indent=2))
        print(f"wikitext2 {run_dir.name}: {ft['ppl']:.2f}", flush=True)


# ---------------------------------------------------------------------------------------- tables


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (method, variant, bits_target)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["variant"], r["bits_target"])].append(r)
    out = []
    for (method, variant, bits), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        agg = {"method": method, "variant": variant, "bits_target": bits, "seeds": len(rs)}
        for col in ("bits_nominal", "bits_effective", "ppl_quantized", "ppl_loftq", "ppl_finetuned",
                    "wikitext2_ppl_finetuned", "weight_sse", "model_bytes", "quantize_time_s", "train_time_s"):
            agg[col], agg[col + "_std"] = _mean_std([r[col] for r in rs])
        out.append(agg)
    return out


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}" if abs(x) < 1e5 else f"{x:.3g}"
    return str(x)


def _pm(a: dict, col: str, digits: int = 2) -> str:
    s = _fmt(a[col], digits)
    return s + (f" ± {_fmt(a[col + '_std'], digits)}" if a["seeds"] > 1 and s != "–" else "")


def markdown_tables(rows: list[dict[str, Any]], agg: list[dict[str, Any]]) -> str:
    fp = next((r["ppl_fp"] for r in rows if r["ppl_fp"]), None)
    wfp = next((r["wikitext2_ppl_fp"] for r in rows if r["wikitext2_ppl_fp"]), None)
    lines = [f"Full-precision stories260K: held-out ppl {_fmt(fp)}, WikiText-2 ppl {_fmt(wfp)}.", "",
             "| method | budget | seeds | nominal bits | effective bits | weight SSE | ppl quantized | ppl LoftQ init "
             "| ppl fine-tuned | WikiText-2 ppl | model bytes | quantize s | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in agg:
        if a["variant"]:
            continue
        lines.append(
            f"| {a['method']} | {_fmt(a['bits_target'])} | {a['seeds']} | {_fmt(a['bits_nominal'], 3)} "
            f"| {_fmt(a['bits_effective'], 3)} | {_fmt(a['weight_sse'], 1)} | {_pm(a, 'ppl_quantized')} "
            f"| {_pm(a, 'ppl_loftq')} | {_pm(a, 'ppl_finetuned')} | {_pm(a, 'wikitext2_ppl_finetuned')} "
            f"| {_fmt(a['model_bytes'], 0)} | {_fmt(a['quantize_time_s'], 1)} | {_fmt(a['train_time_s'], 1)} |")
    abl = [a for a in agg if a["method"] in LOWRA_NAMES and (a["variant"] or a["bits_target"] in (2.0, 4.0))]
    abl = [a for a in abl if a["bits_target"] in {b["bits_target"] for b in agg if b["variant"]}]
    if abl:
        lines += ["", "Ablations of LowRA (same budget, same recipe); NF codebooks = `loftq` rows above "
                  "(NormalFloat, one width per layer, LoftQ init).", "",
                  "| variant | budget | seeds | effective bits | weight SSE | ppl quantized | ppl fine-tuned "
                  "| WikiText-2 ppl |", "|---|---|---|---|---|---|---|---|"]
        for a in sorted(abl, key=lambda a: (a["bits_target"], a["variant"])):
            lines.append(
                f"| {VARIANT_NAMES.get(a['variant'], a['variant'])} | {_fmt(a['bits_target'])} | {a['seeds']} "
                f"| {_fmt(a['bits_effective'], 3)} | {_fmt(a['weight_sse'], 1)} | {_pm(a, 'ppl_quantized')} "
                f"| {_pm(a, 'ppl_finetuned')} | {_pm(a, 'wikitext2_ppl_finetuned')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- plots


def plots(rows: list[dict[str, Any]], agg: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    main = [a for a in agg if not a["variant"]]
    styles = {"lowra": ("o-", "C0"), "lowra_paper": ("o-", "C0"), "loftq": ("s--", "C1"), "qlora": ("^", "C2"),
              "modulora": ("D:", "C3")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, xcol in zip(axes, ("bits_nominal", "bits_effective")):
        for method, (style, color) in styles.items():
            pts = sorted((a[xcol], a["ppl_finetuned"], a["ppl_finetuned_std"]) for a in main if a["method"] == method)
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, fmt=style, color=color, label=method, capsize=3)
        for a in main:
            if a["method"] == "lora":
                ax.axhline(a["ppl_finetuned"], color="k", ls="-.", lw=1, label="lora (fp32 base)")
        fp = next((r["ppl_fp"] for r in rows if r["ppl_fp"]), None)
        if fp:
            ax.axhline(fp, color="gray", ls=":", lw=1, label="full precision, no fine-tuning")
        nominal = xcol == "bits_nominal"
        ax.set_xlabel("nominal code bits / weight" if nominal else "effective bits / weight (all storage)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("held-out TinyStories perplexity (fine-tuned)")
    axes[0].legend(fontsize=8)
    fig.suptitle("stories260K: bits vs perplexity after fine-tuning (100 steps, rank 2)")
    fig.tight_layout()
    written.append(out_dir / "pareto_bits_vs_ppl.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # bit allocation per layer type at 1.15 / 2 / 3 bits (LowRA default, seed 0)
    picks = [b for b in (1.15, 2.0, 3.0)]
    fig, axes = plt.subplots(1, len(picks), figsize=(12, 3.8), sharey=True)
    for ax, bits in zip(axes, picks):
        r = next((r for r in rows if r["method"] in LOWRA_NAMES and not r["variant"] and r["bits_target"] == bits
                  and r["seed"] == 0), None)
        if r is None:
            ax.set_title(f"{bits} bits: no run")
            continue
        hist = r["_bits_by_layer_type"]
        kinds = [k for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj") if k in hist]
        widths = sorted({int(b) for h in hist.values() for b in h})
        bottom = [0.0] * len(kinds)
        for w in widths:
            fr = [hist[k].get(str(w), 0) / max(1, sum(hist[k].values())) for k in kinds]
            ax.bar(kinds, fr, bottom=bottom, label=f"{w} bit")
            bottom = [b + f for b, f in zip(bottom, fr)]
        ax.set_title(f"LowRA {bits} bits (nominal {r['bits_nominal']:.3f})")
        ax.tick_params(axis="x", rotation=45)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("fraction of output channels")
    fig.tight_layout()
    written.append(out_dir / "bit_allocation.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # ablation bars
    abl_bits = sorted({a["bits_target"] for a in agg if a["variant"]})
    if abl_bits:
        bits = 2.0 if 2.0 in abl_bits else abl_bits[0]
        bars = [(VARIANT_NAMES.get(a["variant"], a["variant"]), a) for a in agg
                if a["method"] in LOWRA_NAMES and a["bits_target"] == bits]
        bars += [("NF codebooks (loftq)", a) for a in agg if a["method"] == "loftq" and a["bits_target"] == bits]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, col, title in ((axes[0], "ppl_quantized", "before fine-tuning (base alone)"),
                               (axes[1], "ppl_finetuned", "after fine-tuning")):
            ax.barh([n for n, _ in bars], [a[col] for _, a in bars], xerr=[a[col + "_std"] for _, a in bars],
                    color=[f"C{i}" for i in range(len(bars))])
            ax.set_xscale("log")
            ax.set_xlabel("held-out perplexity")
            ax.set_title(f"{title}, {bits:g} bits")
        fig.tight_layout()
        written.append(out_dir / "ablations.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


# ------------------------------------------------------------------------------------------ main


def collect(runs_root: Path, out_dir: Path, wikitext: bool = True, make_plots: bool = True) -> list[dict[str, Any]]:
    run_dirs = find_runs(runs_root)
    if wikitext:
        wikitext_eval(run_dirs, {})
    rows = [row_of(d, runs_root) for d in run_dirs]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "stories260k_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "stories260k_sweep.json").write_text(json.dumps(
        {"runs_root": str(runs_root), "command": "python -m experiments.studies.collect_results",
         "rows": [{k: v for k, v in r.items() if not k.startswith("_")}
                  | {"bits_by_layer_type": r["_bits_by_layer_type"]} for r in rows]}, indent=2))
    agg = aggregate(rows)
    tables = markdown_tables(rows, agg)
    (out_dir / "stories260k_tables.md").write_text(tables + "\n")
    print(tables)
    if make_plots and rows:
        for p in plots(rows, agg, out_dir):
            print(f"wrote {p}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(REPO / "results" / "runs"))
    parser.add_argument("--out", default=str(REPO / "results"))
    parser.add_argument("--no-wikitext", action="store_true", help="skip the WikiText-2 evaluation of saved models")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args()
    collect(Path(args.runs), Path(args.out), wikitext=not args.no_wikitext, make_plots=not args.no_plots)


if __name__ == "__main__":
    main()
