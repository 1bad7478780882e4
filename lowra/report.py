"""What ``quantize_model`` did: :class:`QuantizationReport` (model) and :class:`LayerReport` (per layer)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["LayerReport", "QuantizationReport", "jsonable"]


@dataclass
class LayerReport:
    """What happened to one target layer (bits are of the base weight only)."""

    name: str
    shape: tuple[int, int]
    bits_histogram: dict[int, int]
    nominal_bits: float
    effective_bits: float
    sse_quant: float
    sse_loftq: float
    loftq_best_iter: int = 0


@dataclass
class QuantizationReport:
    """Summary of ``quantize_model``; ``to_dict()`` is JSON-able.

    ``bits_nominal`` / ``bits_effective`` are weighted by parameter count over the quantized
    layers (code bits only / every stored byte). ``total_sse`` is ``Σ‖W − deq(Q) − s·BA‖²`` after
    LoftQ and ``total_sse_quant`` the same without adapters. ``loftq_iters`` / ``init_codebooks``
    are what the init ran with (``low_bits_init``: the config's low-bit rule chose them). ``plan``
    holds the planner's solve info (objective, lower bound, gap, solve time, …) for
    ``method="lowra"``. ``config`` is the ``LowRAConfig.to_dict()`` the model was quantized with.
    """

    method: str
    bits_target: float | None
    bits_nominal: float
    bits_effective: float
    rank: int
    alpha: float
    loftq_iters: int
    group_size: int
    double_quant: bool
    candidates: tuple[int, ...]
    num_params: int
    layers: list[LayerReport] = field(default_factory=list)
    total_sse_quant: float = 0.0
    total_sse: float = 0.0
    plan: dict[str, Any] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    error_table: str | None = None
    layer_loss_increase: dict[str, list[float]] = field(default_factory=dict)
    init: str = "loftq"
    init_codebooks: str = "fixed"
    low_bits_init: bool = False
    budget_kind: str = "nominal"
    config: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples → lists, int keys → str)."""
        d = asdict(self)
        d["candidates"] = list(self.candidates)
        for layer in d["layers"]:
            layer["shape"] = list(layer["shape"])
            layer["bits_histogram"] = {str(k): v for k, v in layer["bits_histogram"].items()}
        d["plan"] = jsonable(self.plan)
        return d


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() > 1 else value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)
