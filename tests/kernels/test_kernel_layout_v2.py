"""Layout v2 (``lowra_kernels.layout_v2``): lossless restructuring of a stored bit group."""

from __future__ import annotations

import pytest
import torch

from lowra_kernels.dequantize import dequantize_ref
from lowra_kernels.layout import num_groups
from lowra_kernels.layout_v2 import TILE, dequantize_v2_ref, from_v2, tile_words, to_v2
from lowra_kernels.pack import pack_ref


def stored_group(bits: int, out_features: int, n: int, in_features: int, group_size: int, seed: int = 0,
                 shared: bool = False):
    """On-disk tensors of one bit group: codes, rows (a random subset), codebook, absmax of every row."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, in_features), generator=gen)
    rows = torch.randperm(out_features, generator=gen)[:n]
    codebook = torch.rand(1 if shared else n, 2**bits, generator=gen).mul(2).sub(1).to(torch.float16)
    absmax = torch.rand(out_features, num_groups(in_features, group_size), generator=gen).add(0.1).to(torch.float16)
    return pack_ref(codes, bits), rows, codebook, absmax


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("in_features,group_size", [(256, 64), (200, 32), (100, 128), (384, 256), (130, 64)])
def test_round_trip_and_dequantize_match_the_reference(bits, in_features, group_size):
    out_features, n = 48, 37
    codes, rows, codebook, absmax = stored_group(bits, out_features, n, in_features, group_size, seed=bits)
    g = to_v2(codes, rows, codebook, absmax, bits, group_size, in_features)
    assert g.codes.shape == (-(-in_features // TILE), n, tile_words(bits)) and g.codes.dtype == torch.int32
    assert g.scales.shape == (num_groups(in_features, group_size), n)
    assert torch.equal(from_v2(g), codes)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ref = dequantize_ref(codes, rows, codebook, absmax, bits, group_size,
                             torch.full((out_features, in_features), float("nan"), dtype=dtype))
        got = dequantize_v2_ref(g, torch.full((out_features, in_features), float("nan"), dtype=dtype))
        assert torch.equal(got.isnan(), ref.isnan())  # rows outside the group untouched
        assert torch.equal(got[rows], ref[rows])


def test_three_bits_store_three_bits_per_code_as_planes():
    codes, rows, codebook, absmax = stored_group(3, 8, 8, 256, 64)
    g = to_v2(codes, rows, codebook, absmax, 3, 64, 256)
    assert g.stored_bits_per_code == 3.0 and codes.shape[1] * 32 / 256 > 3.0  # on disk 10 codes a word
    # the low plane of a tile is 8 words of 2-bit codes, the high plane 4 words of 1-bit codes
    lo, hi = g.codes[0, 0, :8], g.codes[0, 0, 8:]
    first = [int(c) for c in codes[0, :1]]
    assert (int(lo[0]) & 3) | ((int(hi[0]) & 1) << 2) == first[0] & 7


def test_tile_of_consecutive_rows_is_contiguous():
    codes, rows, codebook, absmax = stored_group(2, 64, 64, 512, 64)
    g = to_v2(codes, rows, codebook, absmax, 2, 64, 512)
    assert g.codes.is_contiguous() and g.codes.stride(1) * 4 == 32  # 32 B a row: a warp of 32 rows reads 1 KB
    assert g.scales.stride(1) == 1


def test_bad_group_size_is_rejected():
    codes, rows, codebook, absmax = stored_group(2, 8, 8, 192, 96)
    with pytest.raises(ValueError, match="group size"):
        to_v2(codes, rows, codebook, absmax, 2, 96, 192)
