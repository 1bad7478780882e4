"""Load-time weight layout v2 of one bit group, for the v2 kernels (``gemv_v2``, ``dequantize_v2``).

The on-disk format stays ``lowra_kernels.layout``'s (row-major ``[n, words]``, 10 codes per 3-bit
word). At load time, one bit group of ``n`` rows is restructured (``to_v2``, pure PyTorch, on any device):

* **K tiles of ``TILE = 128`` codes** (the row padded with zero codes to a multiple of 128). A tile
  of one row is ``TILE · bits / 32`` int32 words (1 bit: 4, 2 bits: 8, 3 bits: 12, 4 bits: 16), a
  multiple of 16 bytes, so one row's tile is whole 16-byte loads;
* **tile-major, rows interleaved**: ``codes[t, i, :]`` is tile ``t`` of row ``i`` (``[tiles, n, words
  per tile]``). The tile of consecutive rows is contiguous: a warp whose lanes take 32 rows reads
  32 × 16 = 512 bytes or more in one go (whole 32-byte sectors), and the programs of a split-K launch
  take contiguous ranges of tiles;
* **3 bits as 2 + 1 bit planes**: a 3-bit tile is 8 words of the low two bits (16 codes a word) then
  4 words of the high bit (32 codes a word) — 3.0 stored bits per code instead of 3.2, every code
  position a constant shift;
* **scales as ``[groups, n]``** (the stored absmax dtype, in the group's row order): the scales of
  one group for consecutive rows are contiguous;
* the codebook stays ``[n or 1, 2^bits]`` and the original row index ``rows [n]``.

Within a word, code ``j`` sits at bit ``j · b`` (least significant first), as on disk. Group sizes
32, 64 and multiples of 128 are supported (a tile holds whole groups, or a group whole tiles).
``from_v2`` inverts ``to_v2`` (the round-trip test), ``dequantize_v2_ref`` is the v2 reference (equal
to ``dequantize_ref`` bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowra_kernels.layout import SUPPORTED_BITS, num_groups
from lowra_kernels.pack import pack_ref
from lowra_kernels.unpack import unpack_ref

TILE = 128  # codes of one row per K tile


def tile_words(bits: int) -> int:
    """int32 words of one row's tile: ``TILE · bits / 32``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bit-width must be one of {SUPPORTED_BITS}, got {bits!r}")
    return TILE * bits // 32


def v2_supported(group_size: int) -> bool:
    """Whether layout v2 takes ``group_size`` (32, 64 or a multiple of ``TILE``; ``check_group_size``)."""
    return group_size in (32, 64) or (group_size > 0 and group_size % TILE == 0)


def check_group_size(group_size: int) -> None:
    """The v2 layout needs a ``group_size`` of 32 or 64 or a multiple of ``TILE`` (a tile holds whole
    groups, or a group whole tiles; a group is at least one 32-code word of every width)."""
    if not v2_supported(group_size):
        raise ValueError(f"the v2 layout needs a group size of 32, 64 or a multiple of {TILE}, got {group_size}")


@dataclass
class V2Group:
    """One bit group in layout v2: ``codes [tiles, n, tile_words]`` int32, ``scales [groups, n]`` (fp16),
    ``codebook [n or 1, 2^bits]``, ``rows [n]``; ``in_features`` and ``group_size`` as stored."""

    bits: int
    codes: torch.Tensor
    scales: torch.Tensor
    codebook: torch.Tensor
    rows: torch.Tensor
    in_features: int
    group_size: int

    @property
    def n_rows(self) -> int:
        return int(self.codes.shape[1])

    @property
    def tiles(self) -> int:
        return int(self.codes.shape[0])

    @property
    def stored_bits_per_code(self) -> float:
        """Code storage per code of the padded rows (3.0 at 3 bits; on disk 3.2)."""
        return self.codes.shape[2] * 32 / TILE


def _tile_codes(codes: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Integer codes ``[n, tiles · TILE]`` (zero past ``in_features``) of on-disk words ``[n, words]``."""
    n = codes.shape[0]
    tiles = -(-in_features // TILE)
    full = torch.zeros(n, tiles * TILE, dtype=torch.int64, device=codes.device)
    full[:, :in_features] = unpack_ref(codes, bits, in_features).to(torch.int64)
    return full


def pack_tiles(full: torch.Tensor, bits: int) -> torch.Tensor:
    """``[tiles, n, tile_words]`` int32 of integer codes ``[n, tiles · TILE]`` (3 bits as 2 + 1 planes)."""
    n, k = full.shape
    tiles = k // TILE
    per_tile = full.view(n * tiles, TILE)
    if bits == 3:
        lo = pack_ref(per_tile & 3, 2)  # [n·tiles, 8]
        hi = pack_ref(per_tile >> 2, 1)  # [n·tiles, 4]
        words = torch.cat([lo, hi], dim=1)
    else:
        words = pack_ref(per_tile, bits)
    return words.view(n, tiles, tile_words(bits)).transpose(0, 1).contiguous()


def unpack_tiles(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``[n, tiles · TILE]`` of ``[tiles, n, tile_words]`` (inverse of ``pack_tiles``)."""
    tiles, n, _ = codes.shape
    words = codes.transpose(0, 1).reshape(n * tiles, -1)
    if bits == 3:
        lo = unpack_ref(words[:, :8].contiguous(), 2, TILE).to(torch.int64)
        hi = unpack_ref(words[:, 8:].contiguous(), 1, TILE).to(torch.int64)
        full = lo | (hi << 2)
    else:
        full = unpack_ref(words.contiguous(), bits, TILE).to(torch.int64)
    return full.view(n, tiles * TILE)


def to_v2(codes: torch.Tensor, rows: torch.Tensor, codebook: torch.Tensor, absmax: torch.Tensor, bits: int,
          group_size: int, in_features: int) -> V2Group:
    """Restructure one stored bit group (on-disk tensors, ``absmax [out, groups]`` of every row) into v2."""
    check_group_size(group_size)
    if codes.dim() != 2 or rows.shape[0] != codes.shape[0]:
        raise ValueError(f"codes must be [n, words] with n = len(rows), got {tuple(codes.shape)} and {len(rows)} rows")
    full = _tile_codes(codes, bits, in_features)
    groups = num_groups(in_features, group_size)
    scales = absmax[rows.to(torch.long)][:, :groups].t().contiguous()  # stored dtype: fp16 (or fp32 restored)
    return V2Group(bits=bits, codes=pack_tiles(full, bits), scales=scales, codebook=codebook.contiguous(),
                   rows=rows, in_features=in_features, group_size=group_size)


def from_v2(g: V2Group) -> torch.Tensor:
    """The on-disk packed words ``[n, words]`` of a v2 group (inverse of ``to_v2`` for the codes)."""
    full = unpack_tiles(g.codes, g.bits)[:, :g.in_features]
    return pack_ref(full, g.bits)


def dequantize_v2_ref(g: V2Group, out: torch.Tensor) -> torch.Tensor:
    """``out[rows[i], j] = codebook[i, code] · scale[j // group, i]`` in fp32, rounded once to
    ``out.dtype`` (the reference of ``dequantize_v2``; equal to ``dequantize_ref``)."""
    if g.n_rows == 0:
        return out
    idx = unpack_tiles(g.codes, g.bits)[:, :g.in_features]
    table = g.codebook.to(torch.float32)
    values = table[0][idx] if table.shape[0] == 1 else torch.gather(table, 1, idx)
    scale = g.scales.t().to(torch.float32).repeat_interleave(g.group_size, dim=1)[:, :g.in_features]
    out[g.rows.to(torch.long)] = (values * scale).to(out.dtype)
    return out


def groups_to_v2(parts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]], absmax: torch.Tensor,
                 group_size: int, in_features: int) -> list[V2Group]:
    """Every non-empty stored bit group ``(bits, codes, rows, codebook)`` of one weight in layout v2
    (``absmax [out, groups]``: the stored or restored group absmax of every row)."""
    return [to_v2(codes, rows, codebook, absmax, bits, group_size, in_features)
            for bits, codes, rows, codebook in parts if rows.numel() > 0]
