"""The result of the planner: :class:`PrecisionPlan` (bits per channel plus solve info)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass
class PrecisionPlan:
    """Result of :func:`assign_precision`.

    Attributes:
        bits: ``[C]`` int64, the bit-width of every channel (values from ``candidates``), in the
            order of the rows of ``errors``.
        candidates: the candidate widths, increasing.
        budget: the target average (code bits per parameter; with ``bit_costs``: cost bits
            per parameter).
        scope: ``"model"`` (one budget over all channels) or ``"matrix"`` (one per matrix).
        average_bits: parameter-weighted average of ``bits`` over all channels (code bits,
            also when ``bit_costs`` were given).
        objective: total SSE of the plan, ``sum_c errors[c, bits_c]``.
        lower_bound: LP-relaxation bound of the flat problem (same scope); no plan can beat it.
        gap: ``(objective - lower_bound) / lower_bound`` (0 when both are 0).
        stage1_objective: stage-1 modelled cost (an upper bound of ``objective`` before repair).
        times: seconds per stage: ``cluster``, ``bound``, ``stage1``, ``stage2``, ``repair``,
            ``total``.
        solver: which solver ran (name and versions).
        info: solver statuses and counters (stage-1 status and MIP gap, clusters per stage-2
            method, repair moves, ...).
        n_clusters: clusters over all partitions.
        params: ``[C]`` parameters per channel.
        layer_sizes: channels per matrix, in order, when known (for :meth:`split`).
        layer_index: ``[C]`` matrix index ``0..L-1`` of every channel when ``layer_ids`` were
            given (the sorted unique ids), else ``None``.
        average_cost_bits: ``sum_c bit_costs[c, j_c] / sum_c n_c`` when ``bit_costs`` were
            given (the quantity the budget bounds), else ``None``.
    """

    bits: np.ndarray
    candidates: tuple[int, ...]
    budget: float
    scope: str
    average_bits: float
    objective: float
    lower_bound: float
    gap: float
    stage1_objective: float
    times: dict[str, float]
    solver: str
    info: dict[str, Any]
    n_clusters: int
    params: np.ndarray
    layer_sizes: tuple[int, ...] | None = None
    layer_index: np.ndarray | None = None
    average_cost_bits: float | None = None

    def split(self, layer_sizes: Sequence[int] | None = None) -> list[np.ndarray]:
        """Split ``bits [C]`` back into one array per matrix, ``[rows_i]`` each, in order.

        ``layer_sizes`` defaults to the one given to :func:`assign_precision`; with
        ``layer_ids`` given there instead, one array per id (sorted ids), rows in order.
        """
        sizes = self.layer_sizes if layer_sizes is None else tuple(int(s) for s in layer_sizes)
        if sizes is None and self.layer_index is not None:
            order = np.argsort(self.layer_index, kind="stable")
            counts = np.bincount(self.layer_index)
            return np.split(self.bits[order], np.cumsum(counts)[:-1])
        if sizes is None:
            raise ValueError("layer_sizes unknown: pass layer_sizes to split() or assign_precision")
        if sum(sizes) != self.bits.shape[0]:
            raise ValueError(f"layer_sizes sum to {sum(sizes)} but the plan has "
                             f"{self.bits.shape[0]} channels")
        return np.split(self.bits, np.cumsum(sizes)[:-1])

    def layer_average_bits(self, layer_sizes: Sequence[int] | None = None) -> np.ndarray:
        """Parameter-weighted average bits of each matrix, ``[num_layers]`` float64."""
        out = []
        for b, n in zip(self.split(layer_sizes), _split_like(self, self.params, layer_sizes)):
            out.append(float((b * n).sum()) / float(n.sum()))
        return np.asarray(out)

    def counts(self) -> dict[int, int]:
        """Number of channels at each candidate width."""
        return {int(b): int((self.bits == b).sum()) for b in self.candidates}

    def summary(self) -> dict[str, Any]:
        """JSON-serializable scalars of the plan (no per-channel arrays)."""
        return {
            "candidates": list(self.candidates), "budget": self.budget, "scope": self.scope,
            "channels": int(self.bits.shape[0]), "average_bits": self.average_bits,
            "average_cost_bits": self.average_cost_bits,
            "objective": self.objective, "lower_bound": self.lower_bound, "gap": self.gap,
            "stage1_objective": self.stage1_objective, "times": dict(self.times),
            "solver": self.solver, "n_clusters": self.n_clusters,
            "counts": {str(k): v for k, v in self.counts().items()},
            "info": {k: v for k, v in self.info.items() if _jsonable(v)},
        }


def _split_like(plan: PrecisionPlan, x: np.ndarray,
                layer_sizes: Sequence[int] | None) -> list[np.ndarray]:
    """``x [C]`` split the way :meth:`PrecisionPlan.split` splits ``bits``."""
    view = dataclasses.replace(plan, bits=x)
    return view.split(layer_sizes)


def _jsonable(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, type(None), list, dict))
