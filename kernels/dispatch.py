"""Choose between a Triton kernel and its PyTorch reference.

``backend="auto"`` runs Triton on CUDA tensors and the reference elsewhere; ``"torch"`` always runs
the reference; ``"triton"`` forces the kernel (on a CPU tensor that only works under
``TRITON_INTERPRET=1``, which must be set before ``triton`` is imported).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(backend: str, tensor: torch.Tensor) -> bool:
    """Whether to run the Triton kernel for data living where ``tensor`` lives."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return tensor.is_cuda
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError(
            "backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is "
            "imported; use backend='auto' or 'torch' for the PyTorch reference"
        )
    return True
