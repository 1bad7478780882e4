"""``PackedWeight``: the tensor-only view of a quantized weight that every kernel takes.

The kernels (``lowra_kernels.*``) never see a ``lowra.format.QuantizedTensor``: the library turns
one into a ``PackedWeight`` once (``QuantizedTensor.packed()``, with double-quantized scales
restored) and passes its tensors and ints on. A weight ``[out, in]`` is the union of one group of
rows per stored bit-width ``bits[j]``:

* ``codes[j]``: int32 ``[n_j, words]`` packed codes (``lowra_kernels.layout``),
* ``rows[j]``: int32 ``[n_j]`` original row of each stored row,
* ``codebooks[j]``: ``[n_j or 1, 2**bits[j]]`` mapping values (fp16 as stored),
* ``absmax``: ``[out, groups]`` group scales of every row in original order (fp16 as stored, or
  the fp32 restore of double-quantized scales),

with ``W[rows[j][i], k] = codebooks[j][i, code] * absmax[rows[j][i], k // group_size]``.
Groups hold at least one row (empty groups are dropped by the library).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import NamedTuple, TypeVar

import torch

from lowra_kernels.layout import SUPPORTED_BITS, words_per_row

T = TypeVar("T")


class PackedWeight(NamedTuple):
    """Tensors and ints of a quantized weight, one entry per stored bit-width (module doc)."""

    codes: tuple[torch.Tensor, ...]
    rows: tuple[torch.Tensor, ...]
    codebooks: tuple[torch.Tensor, ...]
    absmax: torch.Tensor
    bits: tuple[int, ...]
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.absmax.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def groups(self) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``[(bits, codes, rows, codebook), ...]`` in stored order."""
        return list(zip(self.bits, self.codes, self.rows, self.codebooks))

    def op_args(self) -> tuple[list[torch.Tensor], list[int]]:
        """The two arguments the ``lowra::*`` ops take for the weight: ``tensors = [codes…, rows…,
        codebooks…, absmax]`` (one of each per stored width) and ``meta = [group_size, in_features,
        bits…]``. Two schema arguments instead of seven: the dispatcher's per-call Python cost grows
        with the number of schema arguments (``torch._library.utils.fill_defaults`` is quadratic)."""
        return [*self.codes, *self.rows, *self.codebooks, self.absmax], [self.group_size, self.in_features, *self.bits]

    @classmethod
    def from_op_args(cls, tensors: list[torch.Tensor], meta: list[int]) -> PackedWeight:
        """Inverse of ``op_args`` (checked for consistent lengths)."""
        n = len(meta) - 2
        if n < 1 or len(tensors) != 3 * n + 1:
            raise ValueError(f"a packed weight of {n} widths takes 3·{n} + 1 tensors and 2 + {n} ints, got "
                             f"{len(tensors)} tensors and meta {list(meta)}")
        return cls(tuple(tensors[:n]), tuple(tensors[n:2 * n]), tuple(tensors[2 * n:3 * n]), tensors[3 * n],
                   tuple(meta[2:]), meta[0], meta[1])


def check_packed(w: PackedWeight) -> None:
    """Raise ``ValueError`` naming the first inconsistent argument (cheap: shapes and dtypes only)."""
    n = len(w.bits)
    if not n or not len(w.codes) == len(w.rows) == len(w.codebooks) == n:
        raise ValueError(f"a packed weight needs one codes/rows/codebook per bit-width: got {len(w.codes)} codes, "
                         f"{len(w.rows)} rows, {len(w.codebooks)} codebooks for bits {w.bits}")
    if w.group_size < 1 or w.in_features < 1:
        raise ValueError(f"group_size and in_features must be >= 1, got {w.group_size}, {w.in_features}")
    groups = (w.in_features + w.group_size - 1) // w.group_size
    if w.absmax.dim() != 2 or w.absmax.shape[1] != groups:
        raise ValueError(f"absmax must be [out, {groups}], got {tuple(w.absmax.shape)}")
    for b, codes, rows, cb in w.groups():
        if b not in SUPPORTED_BITS:
            raise ValueError(f"bit-width must be one of {SUPPORTED_BITS}, got {b}")
        want = (rows.shape[0], words_per_row(w.in_features, b))
        if codes.dtype != torch.int32 or tuple(codes.shape) != want or rows.dim() != 1:
            raise ValueError(f"{b}-bit codes must be int32 {want}, got {codes.dtype} {tuple(codes.shape)}")
        if cb.dim() != 2 or cb.shape[1] != 1 << b or cb.shape[0] not in (1, rows.shape[0]):
            raise ValueError(f"{b}-bit codebook must be [{rows.shape[0]} or 1, {1 << b}], got {tuple(cb.shape)}")


def weight_key(w: PackedWeight) -> tuple:
    """Identity and in-place version of every tensor of ``w`` (a derived value is stale when it changes)."""
    parts: list = [w.group_size, w.in_features, id(w.absmax), w.absmax._version]
    for b, codes, rows, cb in w.groups():
        parts += [b, id(codes), codes._version, id(rows), rows._version, id(cb), cb._version]
    return tuple(parts)


class WeightCache:
    """Values derived from a ``PackedWeight`` (the CPU extension's tables, a layer's Triton launch plan),
    built once per ``subkey`` (device, dtype, M bucket, …) and kept while the weight's tensors are alive
    and unchanged in place; an entry dies with the weight's first codes tensor.

    The key holds the ``id`` of every tensor of the weight, so an entry also holds those tensors (all but
    the weakly held anchor): an id names one live tensor only while that tensor lives, and a tensor made
    after another died may get its id (e.g. a trainable codebook cast anew every step would otherwise
    match the entry of last step's values)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, tuple, dict, tuple]] = {}

    def get(self, w: PackedWeight, subkey: Hashable, build: Callable[[], T]) -> T:
        anchor = w.codes[0]
        slot, key = id(anchor), weight_key(w)
        entry = self._entries.get(slot)
        if entry is None or entry[0]() is not anchor or entry[1] != key:
            held = tuple(t for t in (w.absmax, *w.codes, *w.rows, *w.codebooks) if t is not anchor)
            entry = (weakref.ref(anchor, lambda ref: self._forget(slot, ref)), key, {}, held)
            self._entries[slot] = entry
        values = entry[2]
        if subkey not in values:
            values[subkey] = build()
        return values[subkey]

    def _forget(self, slot: int, ref: weakref.ref) -> None:
        entry = self._entries.get(slot)
        if entry is not None and entry[0] is ref:
            del self._entries[slot]

    def __len__(self) -> int:
        return len(self._entries)
