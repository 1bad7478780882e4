"""``memory_report(model)``: where the bytes of a LowRA model go, and what bf16 / NF4 QLoRA would cost.

Counted exactly from the stored tensors: codes, row indices (the rows-grouped-by-width layout),
codebooks and group scales of every quantized base; dense frozen bases (``method="none"``);
adapters; every other parameter (embeddings, norms, ``lm_head``) at its dtype. Training memory
adds gradients of the adapters (their dtype) and an AdamW state estimate (two fp32 moments per
trainable parameter; activations are not included).

Comparisons, for the same architecture, adapters and other parameters:
``bf16``: every base weight at 16 bits (16-bit LoRA); ``nf4_qlora``: every target weight at 4 code
bits + QLoRA's double-quantized absmax (8 bits per 64 weights + one fp32 per 256 blocks; the 16-entry
NF4 table is shared) with the other parameters in bf16.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowra.model_layers import lowra_layers

__all__ = ["memory_report"]

QLORA_BLOCK = 64
QLORA_DQ_BLOCK = 256


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_report(model: nn.Module, optimizer: str = "adamw") -> dict[str, Any]:
    """Bytes by category for ``model`` (after ``quantize_model``) plus bf16 / NF4-QLoRA references.

    Returns a JSON-able dict: ``codes``, ``row_index``, ``codebooks``, ``scales``, ``dense_base``,
    ``adapters``, ``other_params`` (bytes); ``model_total``; ``model_total_other_bf16`` (the same
    with non-quantized parameters counted in bf16, the basis of the ``ratio_vs_*`` comparisons); ``gradients`` and
    ``optimizer_state`` estimates; ``training_total``; ``quantized_params`` (base weights
    counted), ``bits_nominal`` / ``bits_effective`` over the quantized bases;
    ``compare: {bf16: …, nf4_qlora: …}`` each with ``model_total`` and ``training_total``.
    """
    layers = lowra_layers(model)
    out = {k: 0 for k in ("codes", "row_index", "codebooks", "scales", "dense_base", "adapters", "other_params")}
    counted: set[int] = set()
    quantized_params = code_bits = base_params = 0
    adapter_params = 0
    for _, m in layers:
        n = m.in_features * m.out_features
        base_params += n
        if m.is_quantized:
            qt = m.qweight
            quantized_params += n
            code_bits += qt.nominal_bits * n
            for key, t in qt.state_dict().items():
                if key.endswith(".codes"):
                    out["codes"] += _nbytes(t)
                elif key.endswith(".rows"):
                    out["row_index"] += _nbytes(t)
                elif key.endswith(".codebook"):
                    out["codebooks"] += _nbytes(t)
                else:
                    out["scales"] += _nbytes(t)
        else:
            out["dense_base"] += _nbytes(m.dense_weight)
            counted.add(id(m.dense_weight))
        if m.bias is not None:
            out["other_params"] += _nbytes(m.bias)
            counted.add(id(m.bias))
        for p in (m.lora_A, m.lora_B):
            if p is not None:
                out["adapters"] += _nbytes(p)
                adapter_params += p.numel()
                counted.add(id(p))
    seen_storage: set[tuple] = set()
    other_numel = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in counted or t.device.type == "meta":
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen_storage:  # tied weights are stored once
            continue
        seen_storage.add(ident)
        if t.is_floating_point() and isinstance(t, nn.Parameter):
            other_numel += t.numel()
        out["other_params"] += _nbytes(t)
    quant_bytes = out["codes"] + out["row_index"] + out["codebooks"] + out["scales"]
    out["model_total"] = quant_bytes + out["dense_base"] + out["adapters"] + out["other_params"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_numel = sum(p.numel() for p in trainable)
    out["trainable_params"] = trainable_numel
    out["gradients"] = sum(_nbytes(p) for p in trainable)
    moments = 2 if optimizer == "adamw" else 1
    out["optimizer_state"] = moments * 4 * trainable_numel
    out["training_total"] = out["model_total"] + out["gradients"] + out["optimizer_state"]
    out["quantized_params"] = quantized_params
    out["bits_nominal"] = code_bits / quantized_params if quantized_params else None
    out["bits_effective"] = quant_bytes * 8 / quantized_params if quantized_params else None

    train_extra = out["gradients"] + out["optimizer_state"]
    other_bf16 = 2 * other_numel
    # ours with the non-quantized parameters in bf16 too, for a like-for-like comparison
    out["model_total_other_bf16"] = quant_bytes + out["dense_base"] + out["adapters"] + other_bf16
    bf16_total = 2 * base_params + other_bf16 + out["adapters"]
    n_blocks = -(-base_params // QLORA_BLOCK)
    nf4_base = base_params // 2 + n_blocks + 4 * -(-n_blocks // QLORA_DQ_BLOCK) + 4 + 16 * 4
    nf4_total = nf4_base + other_bf16 + out["adapters"]
    out["compare"] = {
        "bf16": {"model_total": bf16_total, "training_total": bf16_total + train_extra},
        "nf4_qlora": {
            "base": nf4_base,
            "model_total": nf4_total,
            "training_total": nf4_total + train_extra,
            "bits_effective": nf4_base * 8 / base_params if base_params else None,
        },
    }
    ours = out["model_total_other_bf16"]
    out["compare"]["ratio_vs_bf16"] = ours / bf16_total if bf16_total else None
    out["compare"]["ratio_vs_nf4_qlora"] = ours / nf4_total if nf4_total else None
    return out
