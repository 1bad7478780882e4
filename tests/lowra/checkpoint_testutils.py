"""Helpers of the checkpoint tests (test_checkpoint.py, test_hf.py): the input batch, adapter
perturbation and logits. The shared quantized model is the ``quantized`` fixture of conftest.py."""

from __future__ import annotations

import torch

from lowra.model_layers import lora_parameters

#: token ids ``[2, 40]`` of stories260K's vocabulary (512)
X = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))


def perturb_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Pretend training happened: non-zero B everywhere, so adapters matter for the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    """The model's logits ``[batch, seq, vocab]`` in eval mode."""
    model.eval()
    return model(x).logits


def tiny_mistral_config():
    """An untied two-layer Mistral config (128 tokens, width 64) and a seeded batch ``[2, 12]`` of its ids."""
    from transformers import MistralConfig

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return config, torch.randint(0, 128, (2, 12))
