"""Distillation from the full-precision model: ``(1 − w)·CE + w·T²·KL(teacher ‖ student)``.

``train.distill.weight`` (w) and ``train.distill.temperature`` (T) mix the usual next-token
cross-entropy with the KL divergence from the teacher's (the fp model's) token distribution to the
student's, both softened by T (Hinton et al.: the T² keeps the gradient scale independent of T):

    CE = mean over predicted tokens of −log softmax(z_s)[label]
    KL = mean over predicted tokens of Σ_v p_t,v · (log p_t,v − log p_s,v),
         p_t = softmax(z_t / T), log p_s = log_softmax(z_s / T)

"Predicted tokens" are the positions whose shifted label is not −100 (Hugging Face's causal-LM
convention: position t predicts ``labels[t + 1]``), so with w = 0 this is the model's own loss.

Memory: the decoder of each model runs once (the teacher under ``no_grad``); the LM head, the
softmaxes and both losses then run over ``chunk_tokens`` predicted tokens at a time under activation
checkpointing, so neither model's full ``[tokens, vocab]`` logits exist at once (the student's are
recomputed chunk by chunk in the backward). Causal LMs only (a decoder + an output embedding).
The teacher is loaded on the fly by :func:`load_teacher` (frozen, eval mode, never in the optimizer
or the checkpoint); its load time, parameter bytes and forward time are reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from experiments.runner.chunked_loss import causal_parts, chunks, decoder_hidden, predicted

#: Predicted tokens per chunk of the LM head + losses (config: ``train.distill.chunk_tokens``).
DEFAULT_CHUNK_TOKENS = 512


@dataclass
class DistillStats:
    """What the teacher cost: load time, its parameter bytes, resident-set growth at load, forward time."""

    load_s: float = 0.0
    param_bytes: int = 0
    load_rss_bytes: int = 0
    forward_s: float = 0.0
    forwards: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"teacher_load_s": self.load_s, "teacher_param_bytes": self.param_bytes,
                "teacher_load_rss_bytes": self.load_rss_bytes, "teacher_forward_s": self.forward_s,
                "teacher_forwards": self.forwards, **self.extra}


def freeze(teacher: torch.nn.Module) -> torch.nn.Module:
    """``teacher`` in eval mode with every parameter ``requires_grad=False`` (returned)."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def load_teacher(model_cfg: Any, device: torch.device | str) -> tuple[torch.nn.Module, DistillStats]:
    """The full-precision model of ``model_cfg`` (the runner's loader), frozen, and what loading cost."""
    from experiments.runner.setup import load_model
    from lowra.streaming import current_rss

    rss0, t0 = current_rss(), time.perf_counter()
    teacher = freeze(load_model(model_cfg, device))
    stats = DistillStats(load_s=time.perf_counter() - t0,
                         param_bytes=sum(p.numel() * p.element_size() for p in teacher.parameters()),
                         load_rss_bytes=max(0, current_rss() - rss0))
    return teacher, stats


def _chunk_losses(head_s: torch.nn.Module, head_t: torch.nn.Module, h_s: torch.Tensor, h_t: torch.Tensor,
                  labels: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ CE, Σ KL) over one chunk of predicted tokens: ``h_* [n, d]``, ``labels [n]``."""
    z_s = head_s(h_s).float()
    with torch.no_grad():
        log_p_t = F.log_softmax(head_t(h_t).float() / temperature, dim=-1)
    ce = F.cross_entropy(z_s, labels, reduction="sum")
    log_p_s = F.log_softmax(z_s / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return ce, kl


def distill_loss(student: torch.nn.Module, teacher: torch.nn.Module, batch: dict[str, torch.Tensor],
                 weight: float, temperature: float, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 stats: DistillStats | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The mixed loss (a scalar with a graph into ``student``) and its parts ``{"ce", "kl"}``.

    Args:
        batch: ``{"input_ids": [B, T], "labels": [B, T], "attention_mask"?: [B, T]}``.
        weight: w ∈ [0, 1]; temperature: T > 0; chunk_tokens: predicted tokens per LM-head chunk.
        stats: the teacher's forward time is added to it.
    """
    if not 0.0 <= weight <= 1.0 or temperature <= 0 or chunk_tokens < 1:
        raise ValueError(f"train.distill: weight={weight} must be in [0, 1], temperature={temperature} > 0, "
                         f"chunk_tokens={chunk_tokens} ≥ 1")
    keep, target = predicted(batch, "train.distill")
    head_s, head_t = causal_parts(student, "train.distill")[1], causal_parts(teacher, "train.distill")[1]
    n = target.numel()
    t0 = time.perf_counter()
    with torch.no_grad():
        h_t = decoder_hidden(teacher, batch)[:, :-1][keep]
    if stats is not None:
        stats.forward_s += time.perf_counter() - t0
        stats.forwards += 1
    h_s = decoder_hidden(student, batch)[:, :-1][keep]
    ce = kl = h_s.new_zeros((), dtype=torch.float32)
    for sl in chunks(n, chunk_tokens):
        c, k = checkpoint(_chunk_losses, head_s, head_t, h_s[sl], h_t[sl], target[sl], float(temperature),
                          use_reentrant=False)
        ce, kl = ce + c, kl + k
    ce, kl = ce / n, kl / n
    loss = (1.0 - weight) * ce + weight * temperature**2 * kl
    return loss, {"ce": float(ce.detach()), "kl": float(kl.detach())}


def distill_options(tcfg: Any) -> tuple[float, float, int]:
    """``(weight, temperature, chunk_tokens)`` of ``train.distill`` (absent: weight 0, i.e. off)."""
    d = tcfg.get("distill") if hasattr(tcfg, "get") else getattr(tcfg, "distill", None)
    if not d:
        return 0.0, 1.0, DEFAULT_CHUNK_TOKENS
    return float(d.get("weight", 0.0)), float(d.get("temperature", 1.0)), int(d.get("chunk_tokens",
                                                                                      DEFAULT_CHUNK_TOKENS))
