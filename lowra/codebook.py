"""Learned per-channel codebooks: batched weighted Lloyd-Max over all rows (METHOD.md §1).

Each row of ``W [out, in]`` is split into groups of ``group_size`` inputs and normalized by the
stored group absmax ``a`` (``x = w / a``). For every candidate width b the row gets ``2**b``
mapping values ``c`` and ``2**b - 1`` thresholds ``t`` shared by all its groups, minimizing the
weighted error ``Σ a**p · (x − c[code(x)])**2``; with ``p = 2`` that is exactly the squared error
``Σ (w − c·a)**2`` in the original space.

How it stays fast: each row's normalized values are sorted once (with their weights) and prefix
sums of ``wt``, ``wt·x`` and ``wt·x²`` are taken in float64. A bucket is then a contiguous slice
of the sorted row, found by a binary search of the thresholds, and its weight, centroid and error
come from prefix-sum differences. One Lloyd iteration costs O(rows · 2**b · log in) instead of
O(rows · in), so 20 iterations at three widths cost less than the initial sort. Rows are processed
in chunks to bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowra.normalfloat import normal_float_table
from lowra.scales import GroupScales, compute_absmax
from lowra.validation import check_bits, check_group_size, check_weight

CHUNK_ELEMENTS = 1 << 20


@dataclass
class CodebookResult:
    """Learned codebooks of one weight ``[out, in]`` at each candidate width.

    Attributes:
        bits: candidate widths, in the column order of ``error``.
        codebooks: ``{b: fp32 [out, 2**b]}`` sorted mapping values, exactly representable in fp16
            (the stored precision), in the absmax-normalized space.
        thresholds: ``{b: fp32 [out, 2**b - 1]}`` midpoints of neighbouring mapping values.
        error: float64 ``[out, len(bits)]``: SSE of each row in the original space, of exactly
            what ``QuantizedTensor.from_codebooks`` stores (importance-weighted when
            ``learn_codebooks`` got an ``importance``).
        nf_error: float64 ``[out, len(bits)]``: the same with the NormalFloat table (1 bit: the
            symmetric ±m start), the baseline every learned row must beat.
        iterations: ``{b: iterations run}``.
        history: ``{b: [weighted objective summed over rows, per iteration]}`` (non-increasing).
    """

    bits: tuple[int, ...]
    codebooks: dict[int, torch.Tensor]
    thresholds: dict[int, torch.Tensor]
    error: torch.Tensor
    nf_error: torch.Tensor
    iterations: dict[int, int] = field(default_factory=dict)
    history: dict[int, list[float]] = field(default_factory=dict)

    def column(self, bits: int) -> int:
        """Column of ``error`` that holds width ``bits``."""
        return self.bits.index(bits)


class _SortedRows:
    """Sorted normalized rows of one chunk and float64 prefix sums of their weighted moments.

    Shapes: ``xs [R, in]`` sorted ascending; ``prefix[k] [R, in + 1]`` for the moments
    ``Σ wt·x**k`` (k = 0, 1, 2) with weight ``wt = a**p`` (times the element importance ``F`` when
    ``weigh_codebooks``); ``err_prefix`` the same with ``a**2`` (the original-space error), times
    ``F`` when an importance is given; shared with ``prefix`` when the weights coincide.
    """

    def __init__(self, x: torch.Tensor, scale: torch.Tensor, weight_power: float,
                 importance: torch.Tensor | None = None, weigh_codebooks: bool = False) -> None:
        self.xs, order = x.sort(dim=1)
        scale_sorted = scale.gather(1, order).double()
        imp = None if importance is None else importance.gather(1, order).double()
        fit_wt = scale_sorted ** weight_power
        if imp is not None and weigh_codebooks:
            fit_wt = fit_wt * imp
        err_wt = scale_sorted ** 2 if imp is None else scale_sorted ** 2 * imp
        self.prefix = self._moments(self.xs, fit_wt)
        same = weight_power == 2 and (imp is None or weigh_codebooks)
        self.err_prefix = self.prefix if same else self._moments(self.xs, err_wt)

    @staticmethod
    def _moments(xs: torch.Tensor, wt: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = xs.double()
        pad = torch.nn.functional.pad
        return tuple(pad(torch.cumsum(wt * x**k, dim=1), (1, 0)) for k in range(3))

    def bucket_sums(self, thresholds: torch.Tensor, prefix: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Per-bucket moment sums ``[R, K]`` for thresholds ``[R, K - 1]`` (bucket = #thr < x)."""
        inner = torch.searchsorted(self.xs, thresholds.to(self.xs.dtype).contiguous(), right=True)
        rows, n = self.xs.shape
        edges = torch.cat([
            torch.zeros(rows, 1, dtype=inner.dtype, device=inner.device),
            inner,
            torch.full((rows, 1), n, dtype=inner.dtype, device=inner.device),
        ], dim=1)
        return tuple(p.gather(1, edges[:, 1:]) - p.gather(1, edges[:, :-1]) for p in prefix)

    def error(self, codebook: torch.Tensor, prefix: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """float64 ``[R]`` error of nearest-neighbour quantization with ``codebook [R, K]``."""
        prefix = self.err_prefix if prefix is None else prefix
        s0, s1, s2 = self.bucket_sums(_midpoints(codebook), prefix)
        c = codebook.double()
        return (s2 - 2 * c * s1 + c * c * s0).sum(dim=1).clamp_min(0.0)


def _midpoints(codebook: torch.Tensor) -> torch.Tensor:
    return (codebook[:, 1:] + codebook[:, :-1]) * 0.5


def _to_stored(codebook: torch.Tensor) -> torch.Tensor:
    """Round to the stored fp16 precision and re-sort (fp32 result)."""
    return codebook.to(torch.float16).to(torch.float32).sort(dim=1).values


def _initial_codebook(rows: _SortedRows, bits: int) -> torch.Tensor:
    """NormalFloat start; 1 bit starts from ±m, m = weighted mean of |x| (METHOD.md §1)."""
    n_rows = rows.xs.shape[0]
    if bits == 1:
        s0, s1, _ = rows.prefix
        total_w = s0[:, -1]
        # Σ wt·|x| = Σ_{x>0} wt·x − Σ_{x<=0} wt·x, split at the first positive sorted value.
        split = torch.searchsorted(rows.xs, torch.zeros(n_rows, 1, dtype=rows.xs.dtype), right=True)
        neg = s1.gather(1, split).squeeze(1)
        abs_sum = (s1[:, -1] - neg) - neg
        m = torch.where(total_w > 0, abs_sum / total_w.clamp_min(1e-300), torch.ones_like(total_w))
        m = m.clamp_min(1e-4).to(torch.float32)
        return torch.stack([-m, m], dim=1)
    return normal_float_table(bits).expand(n_rows, -1).clone()


def _lloyd(rows: _SortedRows, init: torch.Tensor, iters: int, tol: float) -> tuple[torch.Tensor, int, list[float]]:
    """Weighted Lloyd-Max from ``init [R, K]``; returns codebook, iterations, objective history."""
    codebook = init.double()
    history = [float(rows.error(codebook, rows.prefix).sum())]
    done = 0
    for step in range(1, iters + 1):
        done = step
        s0, s1, s2 = rows.bucket_sums(_midpoints(codebook), rows.prefix)
        centroid = torch.where(s0 > 0, s1 / s0.clamp_min(1e-300), codebook)
        history.append(float((s2 - 2 * centroid * s1 + centroid**2 * s0).sum()))
        centroid = centroid.sort(dim=1).values
        moved = float((centroid - codebook).abs().max())
        codebook = centroid
        if moved < tol:
            break
    return codebook.to(torch.float32), done, history


def learn_codebooks(
    weight: torch.Tensor,
    bits: tuple[int, ...] | list[int] = (1, 2, 4),
    group_size: int = 64,
    iters: int = 20,
    tol: float = 1e-5,
    weight_power: float = 2.0,
    double_quant: bool = False,
    importance: torch.Tensor | None = None,
    weigh_codebooks: bool = False,
) -> CodebookResult:
    """Learn per-row codebooks of ``weight [out, in]`` at each width in ``bits``.

    Data-free and batched over rows (no Python loop per row). ``double_quant`` must match how the
    weight will be stored, because the normalization uses the stored absmax.

    ``importance [out, in]`` (e.g. a diagonal Fisher, ``lowra.calibration.collect_fisher``) makes
    ``error`` the importance-weighted squared error ``Σⱼ Fᵢⱼ (Wᵢⱼ − Q(W)ᵢⱼ)²`` of each row at each
    width (the planner's loss-aware table, for every candidate in one pass); with
    ``weigh_codebooks`` the Lloyd-Max fit minimizes that weighted error too (as SqueezeLLM's
    sensitivity-weighted k-means), otherwise the codebooks stay data-free.
    """
    check_weight(weight)
    group_size = check_group_size(group_size)
    bits = tuple(check_bits(b) for b in bits)
    if not bits or len(set(bits)) != len(bits):
        raise ValueError(f"bits must be distinct widths from {{1, 2, 3, 4}}, got {bits}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if weight_power < 0:
        raise ValueError(f"weight_power must be >= 0, got {weight_power}")
    if importance is not None:
        if tuple(importance.shape) != tuple(weight.shape):
            raise ValueError(f"importance must have the weight's shape {tuple(weight.shape)}, got "
                             f"{tuple(importance.shape)}")
        if not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
            raise ValueError("importance must be finite and >= 0 (e.g. squared gradients)")

    out_features, in_features = weight.shape
    absmax = GroupScales.store(compute_absmax(weight, group_size), double_quant).restore()
    codebooks = {b: torch.empty(out_features, 2**b) for b in bits}
    error = torch.empty(out_features, len(bits), dtype=torch.float64)
    nf_error = torch.empty_like(error)
    iterations = dict.fromkeys(bits, 0)
    history: dict[int, list[float]] = {}

    chunk = max(1, CHUNK_ELEMENTS // in_features)
    for start in range(0, out_features, chunk):
        stop = min(start + chunk, out_features)
        w = weight[start:stop].detach().to(torch.float32)
        scale = absmax[start:stop].repeat_interleave(group_size, dim=1)[:, :in_features]
        x = torch.where(scale > 0, w / torch.where(scale > 0, scale, 1.0), torch.zeros_like(w))
        imp = None if importance is None else importance[start:stop].to(device=x.device, dtype=torch.float32)
        rows = _SortedRows(x, scale, weight_power, imp, weigh_codebooks)
        del w, x, scale
        for k, b in enumerate(bits):
            init = _initial_codebook(rows, b)
            nf_error[start:stop, k] = rows.error(_to_stored(init))
            learned, n_iter, hist = _lloyd(rows, init, iters, tol)
            learned = _to_stored(learned)
            codebooks[b][start:stop] = learned
            error[start:stop, k] = rows.error(learned)
            iterations[b] = max(iterations[b], n_iter)
            if b in history:
                history[b] = [a + c for a, c in zip(history[b], _pad(hist, len(history[b])))]
            else:
                history[b] = hist
    thresholds = {b: _midpoints(c) for b, c in codebooks.items()}
    return CodebookResult(bits, codebooks, thresholds, error, nf_error, iterations, history)


def _pad(values: list[float], length: int) -> list[float]:
    """Extend a per-chunk history with its last value so chunks of different lengths add up."""
    return values + [values[-1]] * (length - len(values)) if len(values) < length else values[:length]
