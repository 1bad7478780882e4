"""Choose between a Triton kernel and its PyTorch reference.

``backend="auto"`` runs Triton on CUDA tensors and, on CPU tensors, the C++ CPU backend
(``lowra_kernels.cpu_backend``; dequantize and LUT matmul only — other ops run their reference) when it
builds, else the reference after one warning; ``"torch"`` always runs the reference; ``"cpu"``
forces the CPU backend (an error if it cannot be built); ``"triton"`` forces the kernel (on a CPU
tensor that only works under ``TRITON_INTERPRET=1``, which must be set before ``triton`` is
imported).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton", "cpu")
GEMV_V2_ENV = "LOWRA_GEMV_V2"  # "1": the Triton GEMV (M ≤ 4) runs gemv_v2 on layout v2 (opt-in)


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(backend: str, tensor: torch.Tensor) -> bool:
    """Whether to run the Triton kernel for data living where ``tensor`` lives."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("torch", "cpu"):
        return False
    if backend == "auto":
        return tensor.is_cuda
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError(
            "backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is "
            "imported; use backend='auto' or 'torch' for the PyTorch reference"
        )
    return True


def use_cpu(backend: str, tensor: torch.Tensor) -> bool:
    """Whether to run the CPU backend (``lowra_kernels.cpu_backend``) for data living where ``tensor`` is.

    ``"auto"`` picks it for CPU tensors when the extension builds (a failed build warns once and
    the reference runs); ``"cpu"`` demands it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpu":
        if tensor.device.type != "cpu":
            raise ValueError(f"backend='cpu' takes CPU tensors, got a tensor on {tensor.device}")
        return True
    if backend == "auto" and tensor.device.type == "cpu":
        return _cpu_available()
    return False


_cpu_backend = None  # lowra_kernels.cpu_backend, imported on first use (it imports this module's users)


def _cpu_available() -> bool:
    global _cpu_backend
    if _cpu_backend is None:
        from lowra_kernels import cpu_backend

        _cpu_backend = cpu_backend
    return _cpu_backend.available()


def gemv_v2_enabled() -> bool:
    """Whether the Triton GEMV path runs GEMV v2 (``lowra_kernels.gemv_v2``: shuffle lookups on the
    load-time layout v2) instead of v1 — opt-in by ``LOWRA_GEMV_V2=1`` (read per call). Its
    interpreter tests and sm_90 SASS checks pass; its speed awaits a GPU measurement."""
    value = os.environ.get(GEMV_V2_ENV, "0")
    if value not in ("", "0", "1"):
        raise ValueError(f"{GEMV_V2_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def resolve(backend: str, tensor: torch.Tensor) -> str:
    """The implementation that runs for data living where ``tensor`` is: ``"triton"``, ``"cpu"``
    (the C++ extension) or ``"torch"`` (the PyTorch reference). Every backend choice of the ops goes
    through here (``use_triton`` first, then ``use_cpu``; the common ``"auto"`` case is decided inline, as it
    runs once per layer call). Within ``"triton"``, the GEMV's kernel version is ``gemv_v2_enabled``'s choice."""
    if backend == "auto":
        if tensor.is_cuda:
            return "triton"
        if tensor.device.type == "cpu":
            return "cpu" if _cpu_available() else "torch"
        return "torch"
    if use_triton(backend, tensor):
        return "triton"
    if use_cpu(backend, tensor):
        return "cpu"
    return "torch"
