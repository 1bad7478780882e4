"""The v2 kernels (``gemv_v2``, ``dequantize_v2``) against their references, in the interpreter."""

from __future__ import annotations

import pytest
import torch
from kernel_testutils import random_qtensor, requires_triton
from test_kernel_layout_v2 import stored_group

from lowra_kernels.dequantize_v2 import dequantize_v2
from lowra_kernels.gemv_v2 import (
    gemv_v2,
    gemv_v2_block_m,
    gemv_v2_block_n,
    gemv_v2_launch_shape,
    gemv_v2_ref,
    gemv_v2_step_tiles,
)
from lowra_kernels.layout_v2 import dequantize_v2_ref, groups_to_v2, to_v2

pytestmark = requires_triton
# (in_features, group_size, dtype / activation rows): tiles split across groups, partial last tiles and
# groups, groups longer than a tile
CASES = [(256, 64), (200, 32), (130, 128), (256, 256)]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("in_features,group_size,dtype", [c + (d,) for c, d in zip(
    CASES, [torch.float16, torch.float32, torch.float16, torch.float32])])
def test_dequantize_v2_bit_exact(bits, in_features, group_size, dtype):
    codes, rows, codebook, absmax = stored_group(bits, 48, 37, in_features, group_size, seed=bits)
    g = to_v2(codes, rows, codebook, absmax, bits, group_size, in_features)
    ref = dequantize_v2_ref(g, torch.full((48, in_features), float("nan"), dtype=dtype))
    got = dequantize_v2(g, torch.full((48, in_features), float("nan"), dtype=dtype))
    assert torch.equal(got.isnan(), ref.isnan())  # rows of other groups untouched
    assert torch.equal(got[rows], ref[rows])


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("in_features,group_size,m", [c + (m,) for c, m in zip(CASES, [1, 3, 2, 4])])
def test_gemv_v2_matches_reference(bits, in_features, group_size, m):
    codes, rows, codebook, absmax = stored_group(bits, 40, 40, in_features, group_size, seed=bits + 7,
                                                 shared=bits == 2)
    g = to_v2(codes, rows, codebook, absmax, bits, group_size, in_features)
    x = torch.randn(m, in_features, generator=torch.Generator().manual_seed(m))
    got = gemv_v2(x, [g], 40)
    torch.testing.assert_close(got, gemv_v2_ref(x, g, 40), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 4])
def test_gemv_v2_whole_row_blocks_and_m_tiles(bits, m):
    """More rows than a program takes: unmasked whole row blocks and the masked last block; M = 4 with
    fp32 x at 3 bits runs as two M tiles of 2 (``GEMV_V2_MAX_BLOCK_M``)."""
    n = gemv_v2_block_n(bits, gemv_v2_block_m(m, bits, torch.float32)) + 16
    codes, rows, codebook, absmax = stored_group(bits, n + 3, n, 256, 64, seed=bits + 11)
    g = to_v2(codes, rows, codebook, absmax, bits, 64, 256)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(bits))
    torch.testing.assert_close(gemv_v2(x, [g], n + 3), gemv_v2_ref(x, g, n + 3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gemv_v2_odd_in_features_and_unaligned_x(dtype):
    """x is read as aligned pairs: an odd K is padded, a misaligned x copied — results unchanged."""
    codes, rows, codebook, absmax = stored_group(2, 24, 24, 129, 64, seed=5)
    g = to_v2(codes, rows, codebook, absmax, 2, 64, 129)
    buf = torch.randn(2 * 129 + 1, generator=torch.Generator().manual_seed(1)).to(dtype)
    x = buf[1:].view(2, 129)  # odd K, and the data one element off its allocation
    ref = gemv_v2_ref(x, g, 24)
    torch.testing.assert_close(gemv_v2(x, [g], 24).float(), ref, rtol=2e-3 if dtype == torch.float16 else 1e-5,
                               atol=2e-3 if dtype == torch.float16 else 1e-5)


def test_gemv_v2_mixed_weight_fp16_matches_lut_matmul_reference():
    """A mixed-width weight: every row computed once, close to the fp16 reference matmul."""
    from lowra_kernels.lut_matmul import lut_matmul_ref

    qt = random_qtensor(64, 256, torch.tensor([1, 2, 3, 4] * 16), seed=3)
    parts = [(gr.bits, gr.codes, gr.rows, gr.codebook) for gr in qt.groups]
    groups = groups_to_v2(parts, qt.scales.absmax, qt.group_size, 256)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    got = gemv_v2(x, groups, 64)
    ref = lut_matmul_ref(x.float(), qt.packed())  # fp32 weights: v2 applies scales in fp32
    torch.testing.assert_close(got.float(), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gemv_v2_split_k_is_contiguous_and_fills_the_gpu(bits):
    block_n, warps, split, per = gemv_v2_launch_shape(4096, 86, bits)
    assert split * per >= 86 and (split - 1) * per < 86  # contiguous ranges, none empty
    assert per % gemv_v2_step_tiles(bits) == 0  # whole K-loop steps: only the last range ends inside a step
    assert (4096 // block_n) * split >= 132 * 4


def test_gemv_v2_rejects_bad_input():
    codes, rows, codebook, absmax = stored_group(2, 8, 8, 128, 64)
    g = to_v2(codes, rows, codebook, absmax, 2, 64, 128)
    with pytest.raises(ValueError, match="M ≤ 4"):
        gemv_v2(torch.randn(5, 128), [g], 8)
    with pytest.raises(ValueError, match="features"):
        gemv_v2(torch.randn(1, 64), [g], 8)


@pytest.mark.parametrize("m", [1, 3, 6])
def test_lut_matmul_runs_gemv_v2_when_opted_in(monkeypatch, m):
    """``LOWRA_GEMV_V2=1``: the Triton GEMV path (M ≤ 4) runs ``gemv_v2`` on the cached v2 layout and
    matches the reference; M > 4 keeps the v1 kernels; other values of the variable are an error."""
    import lowra_kernels.gemv_v2 as gv
    from lowra_kernels.lut_matmul import lut_matmul, lut_matmul_ref

    qt = random_qtensor(48, 256, torch.tensor([1, 2, 3, 4] * 12), seed=4)
    w = qt.packed()
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
    calls = []
    real = gv.gemv_v2
    monkeypatch.setattr(gv, "gemv_v2", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setenv("LOWRA_GEMV_V2", "1")
    torch.testing.assert_close(lut_matmul(x, w, "triton"), lut_matmul_ref(x, w), rtol=1e-4, atol=1e-4)
    assert calls == ([m] if m <= 4 else [])
    monkeypatch.setenv("LOWRA_GEMV_V2", "yes")
    with pytest.raises(ValueError, match="LOWRA_GEMV_V2"):
        lut_matmul(x, w, "triton")
