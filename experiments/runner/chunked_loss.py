"""Next-token losses of a causal LM without its full ``[tokens, vocab]`` logits.

A causal LM's own loss (``model(**batch).loss``) builds the logits of every position at once, in fp32:
for SmolLM2 (vocabulary 49,152) a micro-batch of 4×256 tokens holds 201 MB of logits, and the
cross-entropy's log-softmax, its gradient and the logits' gradient as much again each. Here the
decoder runs once; the LM head and the loss then run over ``chunk_tokens`` predicted tokens at a
time, so at most ``chunk_tokens × vocab`` logits exist at once:

- training (:func:`chunked_ce`): each chunk runs under activation checkpointing, so its logits are
  freed after its forward and recomputed in the backward (one more LM-head matmul per step);
- evaluation (:func:`token_nll`, no graph): the per-token NLL, chunk by chunk.

Same convention as Hugging Face's loss (position t predicts ``labels[t + 1]``, label −100 ignored,
mean over predicted tokens), the same numbers within fp32 rounding (the sums run in another order).
:mod:`experiments.runner.distill` uses the same pieces for its CE + KL loss. Causal LMs only (a
decoder + an output embedding, no logit post-processing); anything else gets a clear error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def causal_parts(model: torch.nn.Module, what: str = "the chunked loss") -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder, LM head) of a Hugging Face causal LM; a clear error (naming ``what``) for anything else."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    if decoder is None or head is None or getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"{what} needs a causal LM with a decoder and an output embedding; "
                         f"{type(model).__name__} is not one")
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise ValueError(f"{what}: {type(model).__name__} post-processes its logits ({attr}); "
                             "not supported by the chunked loss")
    return decoder, head


def supports_chunked_loss(model: torch.nn.Module) -> bool:
    """Whether :func:`causal_parts` accepts ``model``."""
    try:
        causal_parts(model)
    except ValueError:
        return False
    return True


def decoder_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden states ``[B, T, d]`` for ``batch`` (labels are not passed)."""
    decoder, _ = causal_parts(model)
    kw = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    return decoder(**kw, use_cache=False).last_hidden_state


def predicted(batch: dict[str, torch.Tensor], what: str = "the chunked loss") -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep [B, T-1] bool, target [n])``: the positions that predict a label (not −100) and the labels."""
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    if not bool(keep.any()):
        raise ValueError(f"{what}: the batch has no predicted token (every label is -100)")
    return keep, labels[keep]


def chunks(n: int, chunk_tokens: int) -> list[slice]:
    """``[0, n)`` in slices of ``chunk_tokens`` (≥ 1)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be ≥ 1")
    return [slice(a, a + chunk_tokens) for a in range(0, n, chunk_tokens)]


def _chunk_ce(head: torch.nn.Module, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ CE of one chunk: ``h [c, d]``, ``target [c]``."""
    return F.cross_entropy(head(h).float(), target, reduction="sum")


def chunked_ce(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int) -> torch.Tensor:
    """The model's mean next-token cross-entropy (a scalar with a graph into ``model``), the LM head and
    the loss run ``chunk_tokens`` predicted tokens at a time under activation checkpointing.

    ``batch``: ``{"input_ids": [B, T], "labels": [B, T], "attention_mask"?: [B, T]}``."""
    keep, target = predicted(batch)
    h = decoder_hidden(model, batch)[:, :-1][keep]
    head = causal_parts(model)[1]
    total = h.new_zeros((), dtype=torch.float32)
    for sl in chunks(target.numel(), chunk_tokens):
        total = total + checkpoint(_chunk_ce, head, h[sl], target[sl], use_reentrant=False)
    return total / target.numel()


def model_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int | None) -> torch.Tensor:
    """The training loss: :func:`chunked_ce` with ``chunk_tokens``, the model's own (``model(**batch).loss``,
    full logits) when it is None or 0."""
    if not chunk_tokens:
        return model(**batch).loss
    return chunked_ce(model, batch, int(chunk_tokens))


@torch.no_grad()
def token_nll(model: torch.nn.Module, ids: torch.Tensor, chunk_tokens: int | None) -> torch.Tensor:
    """Per-token NLL ``[B, T-1]`` (fp32) of ``ids [B, T]``: position t predicts ``ids[:, t+1]``. The LM
    head and log-softmax run over ``chunk_tokens`` positions at a time (None or 0: the model's full
    logits at once, as ``model(input_ids=ids).logits``)."""
    if not chunk_tokens:
        logits = model(input_ids=ids).logits.float()  # [B, T, V]
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    h = decoder_hidden(model, {"input_ids": ids})[:, :-1]
    h = h.reshape(-1, h.shape[-1])
    target = ids[:, 1:].reshape(-1)
    head = causal_parts(model)[1]
    nll = torch.cat([F.cross_entropy(head(h[sl]).float(), target[sl], reduction="none")
                     for sl in chunks(target.numel(), int(chunk_tokens))])
    return nll.view(ids.shape[0], ids.shape[1] - 1)
