"""Triton quantize kernel: bit-exact against ``quantize_ref`` (interpreter on CPU)."""

import pytest
import torch
from kernel_testutils import DEVICE, mixed_bits, random_codebooks, requires_triton

from lowra.format import QuantizedTensor, midpoints
from lowra.scales import GroupScales, compute_absmax
from lowra_kernels.quantize import quantize, quantize_ref

pytestmark = requires_triton


def _inputs(rows, cols, bits, seed, shared=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    absmax = GroupScales.store(compute_absmax(w, 64)).restore()
    thr = midpoints(random_codebooks(rows, (bits,), seed=seed, shared=shared)[bits].half())
    return w.to(DEVICE), absmax.to(DEVICE), thr.to(DEVICE)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(37, 172), (70, 256), (1, 5)])
@pytest.mark.parametrize("shared", [False, True])
def test_quantize_bit_exact(bits, shape, shared):
    w, a, thr = _inputs(*shape, bits, seed=bits * 10 + shape[0], shared=shared)
    got = quantize(w, a, thr, bits, 64, backend="triton")
    assert torch.equal(got, quantize_ref(w, a, thr, bits, 64))


@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_fp16_weight_ties_zero_groups_and_nan(bits):
    w, a, thr = _inputs(16, 172, bits, seed=5, dtype=torch.float16)
    a[3, 1] = 0.0  # a zero-absmax group normalizes to 0
    w[4, :8] = (thr[4, :1] * a[4, 0]).to(w.dtype)  # values on (or next to) a threshold
    w[5, :4] = float("nan")
    got = quantize(w, a, thr, bits, 64, backend="triton")
    assert torch.equal(got, quantize_ref(w, a, thr, bits, 64))


def test_quantize_exact_threshold_is_not_below():
    w = torch.tensor([[0.5, 0.25, -0.5, 1.0]], device=DEVICE)
    a = torch.ones(1, 1, device=DEVICE)
    thr = torch.tensor([[-0.5, 0.0, 0.5]], device=DEVICE)
    got = quantize(w, a, thr, 2, 64, backend="triton")
    assert torch.equal(got, quantize_ref(w, a, thr, 2, 64))
    assert int(got[0, 0]) == (2 | 2 << 2 | 0 << 4 | 3 << 6)


def test_quantize_strided_weight_and_checks():
    w, a, thr = _inputs(172, 40, 2, seed=9)
    wt = w.t()  # [40, 172] non-contiguous
    at = GroupScales.store(compute_absmax(wt.cpu(), 64)).restore().to(DEVICE)
    thr = thr[:40]
    assert torch.equal(quantize(wt, at, thr, 2, 64, "triton"), quantize_ref(wt, at, thr, 2, 64))
    with pytest.raises(ValueError):
        quantize(wt, at, thr, 3, 64, "triton")


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantized_tensor_mixed_rows_same_codes(double_quant):
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(70, 172, generator=gen)
    bits = mixed_bits(70)
    cbs = random_codebooks(70)
    ref = QuantizedTensor.from_codebooks(w, bits, cbs, 64, double_quant, backend="torch")
    tri = QuantizedTensor.from_codebooks(w.to(DEVICE), bits.to(DEVICE), {b: c.to(DEVICE) for b, c in cbs.items()},
                                         64, double_quant, backend="triton")
    assert [g.bits for g in tri.groups] == [1, 2, 3, 4]
    for gr, gt in zip(ref.groups, tri.groups, strict=True):
        assert torch.equal(gr.rows, gt.rows.cpu()) and torch.equal(gr.codes, gt.codes.cpu())
