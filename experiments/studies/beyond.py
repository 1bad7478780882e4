"""The study of issue 31 (beyond the paper at 1.15 bits): distillation and the fronts on equal stored bits.

Every configuration is one call of the real runner (``python -m experiments.run`` with overrides,
``logger=none``, 100 steps, the held-out protocol of docs/results.md: first 8,192 tokens of the last
10 % of TinyStories), in ``<out>/<label>_s<seed>/``. After a run, its saved model
(``from_pretrained`` after ``import lowra``) is also scored on **samples of the fp model**: stories
drawn from the fp32 model itself (:func:`fp_samples`: ancestral sampling at temperature 1 from BOS,
``SAMPLE_SEED``, ``SAMPLE_STORIES`` stories of at most ``SAMPLE_TOKENS`` tokens, stored once as token
ids in ``<out>/fp_samples.json``), the same windows (256) and token weighting — text the student
should reproduce if it matched its teacher. The saved model and the resume checkpoint are then
deleted; ``results.json`` (with times and memory), the Hydra config and ``samples.json`` stay.

    python -m experiments.studies.beyond run distill --seeds 0 1 2 --jobs 2
    python -m experiments.studies.beyond run front --seeds 0
    python -m experiments.studies.beyond run tables --seeds 0 1 2 --labels cb_b1.15 cbkd_b1.15
    python -m experiments.studies.beyond table distill      # <out>/table.json + table.md (+ front.png)

A run directory that holds ``samples.json`` is skipped, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "results" / "beyond"
SAMPLE_SEED, SAMPLE_STORIES, SAMPLE_TOKENS = 1234, 48, 256
COMMON = ["logger=none", "progress=false", "eval.max_tokens=8192", "train.max_steps=100", "save_model=true"]

#: label → runner overrides, per study. Distillation: weight / temperature from the probe (docs/results.md).
DISTILL = "train.distill.weight=0.5 train.distill.temperature=1.0"
R4 = "lora.rank=4 lora.alpha=8"
CB = "train.codebooks=trainable"  # trainable codebooks at train.codebook_lr (1e-2), codes frozen
STUDIES: dict[str, dict[str, str]] = {
    "probe": {  # 1.15 bits, seed 0: which weight / temperature (the distill study uses the winner)
        "kd_w0.5_t1_b1.15": "quant=lowra +bits=1.15 train.distill.weight=0.5 train.distill.temperature=1.0",
        "kd_w1_t1_b1.15": "quant=lowra +bits=1.15 train.distill.weight=1.0 train.distill.temperature=1.0",
        "kd_w1_t2_b1.15": "quant=lowra +bits=1.15 train.distill.weight=1.0 train.distill.temperature=2.0",
        "kd_w0.5_t2_b1.15": "quant=lowra +bits=1.15 train.distill.weight=0.5 train.distill.temperature=2.0",
        "kd_w0.25_t1_b1.15": "quant=lowra +bits=1.15 train.distill.weight=0.25 train.distill.temperature=1.0",
    },
    "distill": {
        **{f"lowra_b{b}": f"quant=lowra +bits={b}" for b in (1.15, 1.5, 2)},
        **{f"lowra_kd_b{b}": f"quant=lowra +bits={b} {DISTILL}" for b in (1.15, 1.5, 2)},
    },
    # issue 31 item 3 with the trainable base tables (train.codebooks / train.scales): each option alone and
    # combined, against the runner default (the lowra_b* rows, shared with the distill study)
    "tables": {
        **{f"lowra_b{b}": f"quant=lowra +bits={b}" for b in (1.15, 1.5, 2)},
        **{f"cb_b{b}": f"quant=lowra +bits={b} {CB}" for b in (1.15, 1.5, 2)},
        "cb_lr3e-2_b1.15": f"quant=lowra +bits=1.15 {CB} train.codebook_lr=3e-2",
        "cbsc_b1.15": f"quant=lowra +bits=1.15 {CB} train.scales=trainable",
        "cbkd_b1.15": f"quant=lowra +bits=1.15 {CB} {DISTILL}",
        "cb_wu10_b1.15": f"quant=lowra +bits=1.15 {CB} train.warmup_ratio=0.1",
        # adapter rank 4 (alpha 8: the same LoRA scale 2) instead of the runner's 2, alone and with the tables
        "lowra_r4_b1.15": f"quant=lowra +bits=1.15 {R4}",
        **{f"cb_r4_b{b}": f"quant=lowra +bits={b} {CB} {R4}" for b in (1.15, 1.5, 2)},
    },
    "front": {
        **{f"lowra_b{b}": f"quant=lowra +bits={b}" for b in (1.15, 1.5, 2, 2.5, 3, 4)},
        "lora_fp": "quant=lora",
        "qlora_b4": "quant=qlora +bits=4",
        "loftq_b2": "quant=loftq +bits=2",
        "loftq_b4": "quant=loftq +bits=4",
        "lowra_effective_b4.62": "quant=lowra quant.budget_kind=effective +bits=4.62",
        "lowra_effective_b4.74": "quant=lowra quant.budget_kind=effective +bits=4.74",
        # shared NormalFloat tables instead of per-row codebooks (16 fp16 entries = 4 bits per weight on
        # stories260K's 64-wide rows at 4 bits), the plan and init unchanged
        "lowra_nf_effective_b4.62": "quant=lowra quant.codebook=nf quant.budget_kind=effective +bits=4.62",
        "lowra_nf_effective_b4.74": "quant=lowra quant.codebook=nf quant.budget_kind=effective +bits=4.74",
    },
}


# ------------------------------------------------------------------------------------ fp samples


def fp_samples(path: Path, model_dir: Path) -> list[list[int]]:
    """Stories sampled from the fp model (token ids, BOS first), made once and stored at ``path``."""
    if path.exists():
        return json.loads(path.read_text())["samples"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experiments.runner.logging_utils import atomic_write_json

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    gen = torch.Generator().manual_seed(SAMPLE_SEED)
    ids = torch.full((SAMPLE_STORIES, 1), tok.bos_token_id, dtype=torch.long)
    done = torch.zeros(SAMPLE_STORIES, dtype=torch.bool)
    with torch.no_grad():  # ancestral sampling, temperature 1, no top-k / top-p; all stories in one batch
        out = model(input_ids=ids, use_cache=True)
        for _ in range(SAMPLE_TOKENS - 1):
            probs = torch.softmax(out.logits[:, -1].double(), -1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            done |= (nxt[:, 0] == tok.bos_token_id) | (nxt[:, 0] == tok.eos_token_id)
            ids = torch.cat([ids, torch.where(done[:, None], -1, nxt)], 1)
            if bool(done.all()):
                break
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    samples = [[t for t in row.tolist() if t >= 0] for row in ids]  # a story ends before BOS / EOS
    atomic_write_json(path, {"seed": SAMPLE_SEED, "stories": SAMPLE_STORIES, "max_tokens": SAMPLE_TOKENS,
                             "model": str(model_dir), "samples": samples})
    return samples


def samples_ppl(model: torch.nn.Module, samples: list[list[int]]) -> float:
    """Token-weighted perplexity on the concatenated samples (windows of 256, first 8,192 tokens)."""
    from experiments.eval.evaluate import perplexity

    stream = torch.tensor([t for s in samples for t in s], dtype=torch.long)
    return perplexity(model, stream, window=256, stride=256, max_tokens=8192, progress=False)["ppl"]


# ---------------------------------------------------------------------------------------- running


def run_one(out: Path, label: str, overrides: str, seed: int, samples: list[list[int]]) -> Path:
    """One runner call, then its samples-of-fp perplexity; returns the run directory."""
    run_dir = out / f"{label}_s{seed}"
    if (run_dir / "samples.json").exists():
        return run_dir
    cmd = [sys.executable, "-m", "experiments.run", *COMMON, f"seed={seed}", *overrides.split(),
           f"hydra.run.dir={run_dir}", "restart=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out / f"{label}_s{seed}.log", "w") as logf:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"{label} seed {seed} failed (exit {rc}); see {out / f'{label}_s{seed}.log'}")
    from transformers import AutoModelForCausalLM

    import lowra  # noqa: F401  (registers the quantized checkpoint format with from_pretrained)
    from experiments.runner.logging_utils import atomic_write_json

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "model")).eval()
    atomic_write_json(run_dir / "samples.json", {"ppl_samples": samples_ppl(model, samples),
                                                 "sample_seed": SAMPLE_SEED})
    shutil.rmtree(run_dir / "model", ignore_errors=True)
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    return run_dir


def run_study(study: str, seeds: list[int], jobs: int, out: Path, labels: list[str] | None = None) -> None:
    from experiments.runner.config_check import resolve_path

    samples = fp_samples(out / "fp_samples.json", resolve_path("../shared/assets") / "models" / "stories260K")
    fp = out / "fp_samples_ppl.json"
    if not fp.exists():
        from transformers import AutoModelForCausalLM

        from experiments.runner.logging_utils import atomic_write_json

        model = AutoModelForCausalLM.from_pretrained(str(resolve_path("../shared/assets") / "models"
                                                         / "stories260K")).eval()
        atomic_write_json(fp, {"ppl_samples_fp": samples_ppl(model, samples)})
    unknown = set(labels or []) - set(STUDIES[study])
    if unknown:
        raise SystemExit(f"--labels: {sorted(unknown)} not in study {study!r} ({sorted(STUDIES[study])})")
    from transformers import AutoModelForCausalLM  # imported once here: the workers' lazy imports raced

    import lowra  # noqa: F401

    work = [(label, ov, s) for s in seeds for label, ov in STUDIES[study].items() if not labels or label in labels]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_one, out, label, ov, s, samples) for label, ov, s in work]
        for f in futures:
            try:
                print("done", f.result(), flush=True)
            except RuntimeError as exc:
                print("!!", exc, flush=True)


# ---------------------------------------------------------------------------------------- tables


def _stat(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def collect(out: Path, study: str) -> dict[str, list[dict[str, Any]]]:
    """``{label: [one record per seed]}`` of the study's finished runs."""
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for label in STUDIES[study]:
        for run in sorted(out.glob(f"{label}_s*/samples.json")):
            r = json.loads((run.parent / "results.json").read_text())
            stages = ((r.get("memory") or {}).get("stages") or {}).get("stages", {})
            rows[label].append({
                "seed": r["seed"], "bits_nominal": r["bits_nominal"], "bits_effective": r["bits_effective"],
                "ppl_fp": r["ppl_fp"], "ppl_quantized": r["ppl_quantized"], "ppl_loftq": r["ppl_loftq"],
                "ppl_finetuned": r["ppl_finetuned"], "ppl_samples": json.loads(run.read_text())["ppl_samples"],
                "train_time_s": r["train_time_s"], "wall_time_s": r["wall_time_s"],
                "finetune_peak_rss_bytes": (stages.get("fine-tune") or {}).get("peak_rss_bytes"),
                "distill": r.get("distill"), "command": "python -m experiments.run " + STUDIES[study][label],
            })
    return rows


def markdown(rows: dict[str, list[dict[str, Any]]], fp_samples_ppl: float | None) -> str:
    head = ("| run | nominal bits | effective bits | ppl quantized | ppl after init | ppl fine-tuned (held-out) "
            "| ppl on fp samples | train s | fine-tune peak RSS MB | seeds | command |")
    lines = [head, "|" + "---|" * 11]
    for label, runs in rows.items():
        col = {k: _stat([r[k] for r in runs], d) for k, d in (
            ("bits_nominal", 3), ("bits_effective", 3), ("ppl_quantized", 2), ("ppl_loftq", 2),
            ("ppl_finetuned", 2), ("ppl_samples", 2), ("train_time_s", 0))}
        mb = [r["finetune_peak_rss_bytes"] / 2**20 for r in runs if r["finetune_peak_rss_bytes"]]
        lines.append(f"| {label} | {col['bits_nominal']} | {col['bits_effective']} | {col['ppl_quantized']} "
                     f"| {col['ppl_loftq']} | {col['ppl_finetuned']} | {col['ppl_samples']} "
                     f"| {col['train_time_s']} | {_stat(mb, 0)} | {len(runs)} | `{runs[0]['command']}` |")
    fp = next((r["ppl_fp"] for runs in rows.values() for r in runs if r["ppl_fp"]), None)
    lines.append(f"\nfp32 model: held-out {fp if fp is None else f'{fp:.2f}'}, on its own samples "
                 f"{fp_samples_ppl if fp_samples_ppl is None else f'{fp_samples_ppl:.2f}'}.")
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Fine-tuned held-out ppl against nominal bits (left) and effective bits (right), seed means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    families: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for label, runs in rows.items():
        fam = label.rsplit("_b", 1)[0] if "_b" in label else label
        families[fam].append(tuple(statistics.fmean(r[k] for r in runs)
                                   for k in ("bits_nominal", "bits_effective", "ppl_finetuned")))
    for fam, pts in families.items():
        pts.sort()
        for ax, i in zip(axes, (0, 1), strict=True):
            if fam == "lora_fp":
                ax.axhline(pts[0][2], ls=":", color="gray", label="LoRA (fp32 base)")
            else:
                ax.plot([p[i] for p in pts], [p[2] for p in pts], "o-", label=fam)
    for ax, name in zip(axes, ("nominal bits (codes only)", "effective bits (every stored byte)"), strict=True):
        ax.set_xlabel(name)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out ppl after 100 steps")
    axes[1].legend(fontsize=8)
    fig.suptitle("stories260K: LowRA and baselines, nominal vs stored bits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_tables(study: str, out: Path) -> str:
    from experiments.runner.logging_utils import atomic_write_json

    rows = collect(out, study)
    fp_path = out / "fp_samples_ppl.json"
    fp_s = json.loads(fp_path.read_text())["ppl_samples_fp"] if fp_path.exists() else None
    atomic_write_json(out / f"{study}_table.json", {"rows": rows, "ppl_samples_fp": fp_s})
    text = markdown(rows, fp_s)
    (out / f"{study}_table.md").write_text(text)
    if study == "front" and rows:
        plot(rows, out / "front.png")
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["run", "table"])
    ap.add_argument("study", choices=sorted(STUDIES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--labels", nargs="+", help="only these configurations of the study")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.action == "run":
        run_study(args.study, args.seeds, args.jobs, args.out, args.labels)
    print(write_tables(args.study, args.out))


if __name__ == "__main__":
    main()
