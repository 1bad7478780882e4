"""stories260K through the model-level API: perplexity at 1.15–4 bits, LoftQ, a short fine-tune.

For each budget: held-out TinyStories perplexity of the fp32 model, after quantization (no
adapters: ``loftq_iters=0``, B = 0), after LoftQ init, and after a short fine-tune of the LoftQ
adapters; nominal / effective bits; times. Writes ``results/stories260k_model_api.json`` and
prints a table.

    .venv/bin/python -m experiments.eval.stories                      # 1.15 1.5 2 3 4, rank 2
    .venv/bin/python -m experiments.eval.stories --bits 2 --rank 8 --steps 100

Data (docs/design.md, "Experimental protocol"): held-out = the last 60k characters of
``corpora/tinystories_valid.txt`` (6,144 tokens in windows of 256); fine-tuning text = everything
before it. The helpers below are shared with the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
HELDOUT_CHARS = 60_000
HELDOUT_TOKENS = 6_144
WINDOW = 256


def assets_dir() -> Path:
    """``$LOWRA_ASSETS`` or ``<repo>/../shared/assets``."""
    return Path(os.environ.get("LOWRA_ASSETS") or REPO.parent / "shared" / "assets")


def model_dir() -> Path:
    return assets_dir() / "models" / "stories260K"


def load_model(dtype: torch.dtype = torch.float32):
    """stories260K (``LlamaForCausalLM``) in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir()), dtype=dtype).eval()


def token_splits(
    heldout_chars: int = HELDOUT_CHARS, heldout_tokens: int = HELDOUT_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_ids [N], heldout_ids [heldout_tokens])`` of TinyStories, tokenized with tok512."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    text = (assets_dir() / "corpora" / "tinystories_valid.txt").read_text()
    train = tok(text[:-heldout_chars], return_tensors="pt").input_ids[0]
    heldout = tok(text[-heldout_chars:], return_tensors="pt").input_ids[0][:heldout_tokens]
    return train, heldout


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int = WINDOW, batch: int = 8) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``ids [N]``."""
    was_training = model.training
    model.eval()
    n = ids.numel() // window
    x = ids[: n * window].view(n, window)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        xb = x[i:i + batch]
        loss = model(xb, labels=xb).loss
        tokens = xb.numel() - xb.shape[0]
        total += float(loss) * tokens
        count += tokens
    model.train(was_training)
    return math.exp(total / count)


def finetune(
    model,
    train_ids: torch.Tensor,
    steps: int = 50,
    lr: float = 3e-3,
    batch_size: int = 8,
    seq_len: int = 128,
    seed: int = 0,
) -> list[float]:
    """Train the LoRA adapters (only) for ``steps`` AdamW steps on random windows; returns losses."""
    from lowra.model_layers import lora_parameters, mark_only_lora_trainable

    mark_only_lora_trainable(model)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, train_ids.numel() - seq_len - 1, (batch_size,), generator=gen)
        xb = torch.stack([train_ids[s:s + seq_len] for s in starts.tolist()])
        loss = model(xb, labels=xb).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def run_budget(bits: float, rank: int, alpha: float, steps: int, lr: float, loftq_iters: int,
               train_ids: torch.Tensor, heldout: torch.Tensor, plan_options: dict) -> dict:
    """One row of the table (see the module docstring)."""
    from lowra.model_quantization import quantize_model

    row: dict = {"bits": bits}
    model = load_model()
    t0 = time.perf_counter()
    report0 = quantize_model(model, bits, rank=rank, alpha=alpha, loftq_iters=0, progress=False,
                             plan_options=plan_options)
    row["time_quantize_s"] = time.perf_counter() - t0
    row["ppl_quantized"] = perplexity(model, heldout)
    model = load_model()
    t0 = time.perf_counter()
    report = quantize_model(model, bits, rank=rank, alpha=alpha, loftq_iters=loftq_iters, progress=False,
                            plan_options=plan_options)
    row["time_quantize_loftq_s"] = time.perf_counter() - t0
    row["ppl_loftq"] = perplexity(model, heldout)
    t0 = time.perf_counter()
    losses = finetune(model, train_ids, steps=steps, lr=lr)
    row["time_finetune_s"] = time.perf_counter() - t0
    row["ppl_finetuned"] = perplexity(model, heldout)
    row.update(
        bits_nominal=report.bits_nominal, bits_effective=report.bits_effective,
        sse_quant=report0.total_sse_quant, sse_loftq=report.total_sse,
        times=report.times, plan={k: report.plan.get(k) for k in ("objective", "lower_bound", "gap", "counts")},
        train_loss_first=losses[0], train_loss_last=sum(losses[-10:]) / min(10, len(losses)),
    )
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=float, nargs="+", default=[1.15, 1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--loftq-iters", type=int, default=1)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--clusters", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default=str(REPO / "results" / "stories260k_model_api.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train_ids, heldout = token_splits()
    fp32 = perplexity(load_model(), heldout)
    rows = []
    for bits in args.bits:
        rows.append(run_budget(bits, args.rank, args.alpha, args.steps, args.lr, args.loftq_iters,
                               train_ids, heldout, {"clusters": args.clusters}))
        r = rows[-1]
        print(f"bits {bits:>4}: ppl quant {r['ppl_quantized']:.2f}  loftq {r['ppl_loftq']:.2f}  "
              f"finetuned {r['ppl_finetuned']:.2f}", flush=True)
    result = {
        "model": "stories260K", "ppl_fp32": fp32, "rank": args.rank, "alpha": args.alpha,
        "loftq_iters": args.loftq_iters, "finetune_steps": args.steps, "lr": args.lr,
        "heldout_tokens": int(heldout.numel()), "window": WINDOW, "rows": rows,
        "torch_threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nfp32 perplexity {fp32:.3f}  (rank {args.rank}, alpha {args.alpha:g}, {args.steps} steps)")
    print(f"{'bits':>5} {'nominal':>8} {'effective':>9} {'ppl quant':>10} {'ppl LoftQ':>10} {'ppl tuned':>10} "
          f"{'quant s':>8} {'tune s':>7}")
    for r in rows:
        print(f"{r['bits']:>5} {r['bits_nominal']:>8.3f} {r['bits_effective']:>9.3f} {r['ppl_quantized']:>10.2f} "
              f"{r['ppl_loftq']:>10.2f} {r['ppl_finetuned']:>10.2f} {r['time_quantize_loftq_s']:>8.1f} "
              f"{r['time_finetune_s']:>7.1f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
