"""Evaluation: token-weighted perplexity on fixed windows, and ROUGE on generated summaries.

Perplexity protocol (documented in ``conf/eval/default.yaml``): take the first ``max_tokens``
tokens of the held-out stream ``[N]``; windows of ``window`` tokens start every ``stride``
tokens; each window scores only the tokens no earlier window has scored (with
``stride == window`` the windows are disjoint and the first token of each window is context
only). ``ppl = exp(Σ NLL / Σ scored tokens)`` — token-weighted, not a mean of per-window ppl.

``python -m experiments.eval.evaluate …`` runs lm-evaluation-harness tasks and WikiText-2 perplexity in
the GPTQ convention on a quantized + adapted model (:mod:`experiments.eval.harness`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from experiments.runner.chunked_loss import token_nll
from experiments.runner.progress import progress_iter


@dataclass(frozen=True)
class Window:
    """``stream[begin:end]`` is fed; tokens at positions ``≥ first_target`` are scored."""

    begin: int
    end: int
    first_target: int


def make_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """The evaluation windows of a stream of ``n_tokens`` tokens (see the module docstring)."""
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to evaluate, got {n_tokens}")
    windows: list[Window] = []
    scored_until = 1  # token 0 is never predicted
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + window, n_tokens)
        if end > scored_until:
            windows.append(Window(begin, end, max(scored_until, begin + 1)))
            scored_until = end
        begin += stride
    return windows


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    stream: torch.Tensor,
    window: int = 256,
    stride: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    desc: str = "perplexity",
    progress: bool = True,
    chunk_tokens: int | None = None,
) -> dict[str, float]:
    """Token-weighted perplexity of a causal LM on ``stream`` ``[N]`` (int64).

    ``chunk_tokens``: the LM head and log-softmax run over this many positions at a time
    (``model.loss_chunk_tokens``; None: the model's full ``[B, T, vocab]`` logits at once).
    Returns ``{"ppl", "nll", "tokens", "windows"}`` (``nll`` is the mean NLL in nats per token).
    """
    stream = stream[:max_tokens] if max_tokens else stream
    windows = make_windows(stream.numel(), window, stride)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    # Windows of equal length are batched together (only the last one may be shorter).
    batches: list[list[Window]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[0].end - last[0].begin == w.end - w.begin:
            last.append(w)
        else:
            batches.append([w])
    try:
        for batch in progress_iter(batches, desc, progress):
            ids = torch.stack([stream[w.begin : w.end] for w in batch]).to(device)
            nll = token_nll(model, ids, chunk_tokens)  # [B, T-1]: position t predicts token t+1
            for i, w in enumerate(batch):
                start = w.first_target - w.begin - 1
                total_nll += float(nll[i, start:].sum())
                total_tokens += w.end - w.first_target
    finally:
        model.train(was_training)
    mean_nll = total_nll / total_tokens
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": total_tokens, "windows": len(windows)}


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


@torch.no_grad()
def generate_summaries(
    model: torch.nn.Module,
    tokenizer: Any,
    sources: list[str],
    arch: str,
    prompt_template: str | None,
    max_source_length: int = 512,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[str]:
    """Generated summaries (greedy or beam search), one per source document."""
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    if arch == "causal_lm":
        tokenizer.padding_side = "left"  # generation continues the prompt
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        for i in progress_iter(range(0, len(sources), batch_size), "generate", progress):
            chunk = sources[i : i + batch_size]
            if arch == "causal_lm" and prompt_template:
                chunk = [prompt_template.format(source=s) for s in chunk]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_source_length)
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            if arch == "causal_lm":
                out = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure × 100 (``rouge-score``, Porter stemmer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        for k in ROUGE_KEYS:
            totals[k] += scores[k].fmeasure
    n = max(1, len(predictions))
    return {k: 100.0 * v / n for k, v in totals.items()}


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    data: Any,
    cfg: Any,
    device: torch.device | str,
    desc: str,
    progress: bool = True,
) -> dict[str, Any]:
    """The task's metric: ``{"ppl": …}`` for lm data, ``{"rouge1", "rouge2", "rougeL"}`` else."""
    e = cfg.eval
    if cfg.data.task == "lm":
        return perplexity(
            model, data.eval_ids, window=e.window, stride=e.stride, max_tokens=e.max_tokens,
            batch_size=e.batch_size, device=device, desc=desc, progress=progress,
            chunk_tokens=cfg.model.get("loss_chunk_tokens"),
        )
    pairs = data.eval[: e.num_samples]
    preds = generate_summaries(
        model, tokenizer, [s for s, _ in pairs], cfg.model.arch, cfg.data.prompt_template,
        max_source_length=e.max_source_length, max_new_tokens=e.max_new_tokens,
        num_beams=e.num_beams, batch_size=e.batch_size, device=device, progress=progress,
    )
    return rouge(preds, [t for _, t in pairs])


if __name__ == "__main__":  # pragma: no cover - the CLI lives in experiments.eval.harness
    from experiments.eval.harness import main

    main()
