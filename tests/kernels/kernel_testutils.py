"""Shared helpers for the kernel tests (imported by basename; tests/ has no packages)."""

from __future__ import annotations

import pytest
import torch

from lowra_kernels.dispatch import interpreting

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

requires_triton = pytest.mark.skipif(
    not (CUDA or interpreting()),
    reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (set by tests/conftest.py)",
)


def mixed_bits(out_features: int, choices: tuple[int, ...] = (1, 2, 3, 4), seed: int = 0) -> torch.Tensor:
    """Bits per row with the widths interleaved at random (every width present if out allows)."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.tensor(choices)[torch.arange(out_features) % len(choices)]
    return bits[torch.randperm(out_features, generator=gen)]


def random_codebooks(out_features: int, bits: tuple[int, ...] = (1, 2, 3, 4), seed: int = 0,
                     shared: bool = False) -> dict[int, torch.Tensor]:
    """Sorted random mapping values in [-1, 1]: ``[out, 2**b]`` per row, or ``[1, 2**b]``."""
    gen = torch.Generator().manual_seed(seed)
    rows = 1 if shared else out_features
    return {b: torch.rand(rows, 2**b, generator=gen).mul(2).sub(1).sort(dim=1).values for b in bits}


def random_qtensor(out_features: int, in_features: int, bits: torch.Tensor | int, seed: int = 0,
                   shared: bool = False, double_quant: bool = False, group_size: int = 64):
    """A ``QuantizedTensor`` of a random weight (built with the reference quantizer)."""
    from lowra.format import QuantizedTensor

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen)
    return QuantizedTensor.from_codebooks(
        w, bits, random_codebooks(out_features, seed=seed + 1, shared=shared),
        group_size=group_size, double_quant=double_quant, backend="torch",
    ).to(DEVICE)


def linear_op(x: torch.Tensor, q, backend: str = "auto", lora_A: torch.Tensor | None = None,
              lora_B: torch.Tensor | None = None, bias: torch.Tensor | None = None, scaling: float = 1.0):
    """``torch.ops.lowra.lut_linear`` on a ``QuantizedTensor`` (its packed view), as ``LowRALinear`` calls it."""
    import lowra_kernels.lut_linear  # noqa: F401  (registers the op)

    tensors, meta = q.packed().op_args()
    return torch.ops.lowra.lut_linear(x, tensors, lora_A, lora_B, bias, meta, scaling, backend)
