"""Input checks shared by the public API: each failure is a ValueError that names the problem."""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4)


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    """A weight must be a non-empty, finite, floating-point 2-D tensor ``[out, in]``."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(weight.shape)})")
    if not weight.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {weight.dtype}")
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        n_bad = int((~finite).sum())
        raise ValueError(f"{name} has {n_bad} NaN/Inf values (first at row {bad[0]}, col {bad[1]})")


def check_bits(bits: int, allowed: tuple[int, ...] = SUPPORTED_BITS) -> int:
    """A bit-width must be an integer in ``allowed`` (default {1, 2, 3, 4})."""
    if isinstance(bits, bool) or int(bits) != bits or int(bits) not in allowed:
        raise ValueError(f"bit-width must be one of {allowed}, got {bits!r}")
    return int(bits)


def check_group_size(group_size: int) -> int:
    """A group size must be a positive integer."""
    if isinstance(group_size, bool) or int(group_size) != group_size or int(group_size) < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    return int(group_size)
