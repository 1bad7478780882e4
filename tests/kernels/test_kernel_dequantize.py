"""Triton dequantize kernel: bit-exact against ``dequantize_ref`` (interpreter on CPU)."""

import pytest
import torch
from kernel_testutils import DEVICE, mixed_bits, random_qtensor, requires_triton

from lowra_kernels.dequantize import dequantize, dequantize_ref
from lowra_kernels.layout import num_groups
from lowra_kernels.pack import pack_ref

pytestmark = requires_triton

NAN = float("nan")


def _group(n, out_features, in_features, bits, seed, shared=False, group_size=64):
    gen = torch.Generator().manual_seed(seed)
    codes = pack_ref(torch.randint(0, 2**bits, (n, in_features), generator=gen), bits)
    rows = torch.randperm(out_features, generator=gen)[:n].to(torch.int32)
    cb = torch.randn(1 if shared else n, 2**bits, generator=gen).half()
    absmax = torch.rand(out_features, num_groups(in_features, group_size), generator=gen)
    return codes.to(DEVICE), rows.to(DEVICE), cb.to(DEVICE), absmax.to(DEVICE)


def _same(a, b):
    return torch.equal(a.nan_to_num(12345.0), b.nan_to_num(12345.0))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(37, 172), (70, 256), (130, 9)])
@pytest.mark.parametrize("shared", [False, True])
def test_dequantize_bit_exact(bits, shape, shared):
    out_features, in_features = shape
    codes, rows, cb, absmax = _group(out_features - 3, out_features, in_features, bits, bits + out_features, shared)
    got = torch.full(shape, NAN, device=DEVICE)
    want = got.clone()
    dequantize(codes, rows, cb, absmax, bits, 64, got, backend="triton")
    dequantize_ref(codes, rows, cb, absmax, bits, 64, want)
    assert _same(got, want)
    assert torch.isnan(got).sum() == 3 * in_features  # rows of other widths untouched


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("absmax_dtype", [torch.float32, torch.float16])
def test_dequantize_dtypes(bits, out_dtype, absmax_dtype):
    codes, rows, cb, absmax = _group(50, 60, 172, bits, seed=3)
    absmax = absmax.to(absmax_dtype)
    got = torch.full((60, 172), NAN, dtype=out_dtype, device=DEVICE)
    want = got.clone()
    dequantize(codes, rows, cb, absmax, bits, 64, got, backend="triton")
    dequantize_ref(codes, rows, cb, absmax, bits, 64, want)
    assert _same(got, want)


# (bits, group_size) → the 3/4-bit step kinds: gathered tables of 1, 2 and 4 groups over 16, 8, 4 and
# 1-word steps, and the select-tree fallback for groups too small for a 4-group table
# (bits, group_size, words per step, table groups; 0 = select tree)
GATHER_CASES = [(3, 64, 16, 4), (3, 32, 8, 4), (3, 256, 16, 2), (3, 4, 1, 4), (3, 2, 4, 0), (4, 64, 8, 1),
                (4, 4096, 32, 1), (4, 36, 8, 4), (4, 132, 16, 2), (4, 200, 1, 1), (4, 4, 1, 4), (4, 2, 4, 0)]


@pytest.mark.parametrize("bits,group_size,words,groups", GATHER_CASES)
def test_dequantize_gather_group_sizes(bits, group_size, words, groups):
    from lowra_kernels.lut import dequant_step, gather_groups

    step = dequant_step(bits, group_size)
    assert step[0] == words and gather_groups(bits, step[0], step[2], group_size) == groups
    out_features, in_features = 21, 250  # 250 = 25 3-bit words; a partial last word at 4 bits
    codes, rows, cb, absmax = _group(19, out_features, in_features, bits, seed=bits * 7 + group_size,
                                     group_size=group_size)
    for dtype in (torch.float32, torch.float16):
        got = torch.full((out_features, in_features), NAN, dtype=dtype, device=DEVICE)
        want = got.clone()
        dequantize(codes, rows, cb, absmax, bits, group_size, got, backend="triton")
        dequantize_ref(codes, rows, cb, absmax, bits, group_size, want)
        assert _same(got, want)
        assert torch.isnan(got).sum() == 2 * in_features


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_dequantize_every_shipped_config(bits):
    """The interpreter autotunes over the first config only: run each config the compiled autotuner
    keeps for this width (multi-step programs, 32/64-row tiles) through the kernel body directly."""
    from lowra_kernels.dequantize import DEQUANT_CONFIGS, _dequantize_kernel, _launch, prune_dequantize_configs
    from lowra_kernels.lut import dequant_step

    words, pw2, aligned = dequant_step(bits, 64)
    kept = prune_dequantize_configs(list(DEQUANT_CONFIGS), {}, BITS=bits, WORDS=words, PW2=pw2, ALIGNED=aligned,
                                    GROUP=64)
    assert len(kept) == len(DEQUANT_CONFIGS) == 4  # every width may take every shipped config (H200 sweep)
    out_features, in_features = 70, 200 + 17 * bits  # a partial last program along K and along rows
    codes, rows, cb, absmax = _group(67, out_features, in_features, bits, seed=11 + bits)
    want = torch.full((out_features, in_features), NAN, dtype=torch.float16, device=DEVICE)
    dequantize_ref(codes, rows, cb, absmax, bits, 64, want)
    for cfg in kept:
        got = torch.full_like(want, NAN)
        _launch(_dequantize_kernel.fn, codes, rows, cb, absmax, bits, 64, got, **cfg.kwargs)
        assert _same(got, want), cfg.kwargs


def test_dequantize_group_size_and_strided_output():
    codes, rows, cb, absmax = _group(20, 20, 100, 3, seed=4)
    absmax = torch.rand(20, num_groups(100, 32), device=DEVICE)
    base = torch.full((100, 20), NAN, device=DEVICE)
    got = base.t()  # [20, 100] column-major view
    want = torch.full((20, 100), NAN, device=DEVICE)
    dequantize(codes, rows, cb, absmax, 3, 32, got, backend="triton")
    dequantize_ref(codes, rows, cb, absmax, 3, 32, want)
    assert _same(got, want)


def test_dequantize_empty_group_leaves_output():
    codes, rows, cb, absmax = _group(0, 8, 172, 4, seed=5)
    out = torch.full((8, 172), NAN, device=DEVICE)
    dequantize(codes, rows, cb[:0] if cb.shape[0] else cb, absmax, 4, 64, out, backend="triton")
    assert torch.isnan(out).all()


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_matrix_bit_exact(double_quant, dtype):
    q = random_qtensor(70, 172, mixed_bits(70), seed=6, double_quant=double_quant)
    got = q.dequantize(dtype, backend="triton")  # fills NaN first, one launch per width
    assert not torch.isnan(got).any()
    assert torch.equal(got.cpu(), q.to("cpu").dequantize(dtype, backend="torch"))


@pytest.mark.parametrize("choices", [(1, 4), (2,), (1, 2, 4)])
def test_widths_without_rows_and_shared_codebook(choices):
    q = random_qtensor(45, 172, mixed_bits(45, choices), seed=7, shared=True)
    assert sorted(g.bits for g in q.groups) == sorted(choices)
    got = q.dequantize(torch.float32, backend="triton")
    assert torch.equal(got.cpu(), q.to("cpu").dequantize(torch.float32, backend="torch"))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gpu_dequantize_bf16_and_large(bits):
    q = random_qtensor(1024, 4096 + 172, mixed_bits(1024, (bits, 4)), seed=8)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        got = q.dequantize(dtype, backend="triton")
        assert torch.equal(got.cpu(), q.to("cpu").dequantize(dtype, backend="torch"))
