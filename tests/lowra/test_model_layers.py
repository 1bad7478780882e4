"""Target selection and adapter helpers (lowra/model_layers.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowra.model_quantization
from lowra import model_layers
from lowra.model_layers import find_target_linears, lora_parameters, lowra_layers, mark_only_lora_trainable


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.up_proj = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(16)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.lm_head = nn.Linear(16, 8)


def test_targets_peft_semantics_and_lm_head_skipped():
    model = _Toy()
    every = [n for n, _ in find_target_linears(model, None)]
    assert every == ["layers.0.q_proj", "layers.0.up_proj", "layers.1.q_proj", "layers.1.up_proj"]
    assert [n for n, _ in find_target_linears(model, ["q_proj"])] == ["layers.0.q_proj", "layers.1.q_proj"]
    assert [n for n, _ in find_target_linears(model, r"layers\.1\..*")] == ["layers.1.q_proj", "layers.1.up_proj"]
    assert [n for n, _ in find_target_linears(model, ["lm_head"])] == ["lm_head"]  # named explicitly
    with pytest.raises(ValueError, match="'k_proj' matches no nn.Linear.*q_proj"):
        find_target_linears(model, ["q_proj", "k_proj"])
    with pytest.raises(ValueError, match="regex 'nothing' matches no nn.Linear"):
        find_target_linears(model, "nothing")


def test_adapter_helpers_after_quantization():
    torch.manual_seed(0)
    model = _Toy()
    lowra.model_quantization.quantize_model(model, 2, method="nf", rank=2, alpha=4, target_modules=["q_proj"],
                                            progress=False)
    names = [n for n, _ in lowra_layers(model)]
    assert names == ["layers.0.q_proj", "layers.1.q_proj"]
    assert len(lora_parameters(model)) == 4
    assert mark_only_lora_trainable(model) == 2 * (2 * 16 + 16 * 2)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"layers.{i}.q_proj.lora_{ab}" for i in (0, 1) for ab in "AB"}
    with pytest.raises(ValueError, match="already contains LowRALinear"):
        find_target_linears(model, None)


def test_public_api_gives_the_layer_helpers_of_their_one_module():
    """``lowra.<helper>`` is the helper of ``lowra.model_layers`` (no second copy re-exported elsewhere)."""
    for name in ("find_target_linears", "lora_parameters", "lowra_layers", "mark_only_lora_trainable"):
        assert getattr(lowra, name) is getattr(model_layers, name)
    assert not hasattr(lowra.model_quantization, "lowra_layers")
