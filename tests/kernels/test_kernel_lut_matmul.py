"""Fused LUT matmul: Triton forward/backward against ``x @ deq(W).T`` (interpreter on CPU)."""

import pytest
import torch
from kernel_testutils import DEVICE, linear_op, mixed_bits, random_qtensor, requires_triton

from lowra_kernels.lut_matmul import (
    lut_matmul,
    lut_matmul_backward,
    lut_matmul_backward_ref,
    lut_matmul_ref,
)

TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-2, atol=5e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def _dense(q, dtype=torch.float64):
    return q.to("cpu").dequantize(torch.float32, backend="torch").to(dtype)


def _check(got, want, dtype):
    """Compare against an fp64 oracle; errors are measured relative to the output's scale."""
    scale = want.abs().max().item() + 1e-6
    torch.testing.assert_close(got.double().cpu() / scale, want / scale, **TOL[dtype])


# ------------------------------------------------------------------------- reference path (CPU)
def test_reference_forward_backward_match_dense():
    q = random_qtensor(40, 172, mixed_bits(40), seed=1).to("cpu")
    x = torch.randn(3, 5, 172, dtype=torch.float64)
    w = _dense(q)
    torch.testing.assert_close(lut_matmul_ref(x, q.packed()), x @ w.t())
    gy = torch.randn(3, 5, 40, dtype=torch.float64)
    torch.testing.assert_close(lut_matmul_backward_ref(gy, q.packed()), gy @ w)


def test_gradcheck_reference_float64():
    q = random_qtensor(12, 70, mixed_bits(12, (1, 2, 4)), seed=2).to("cpu")
    x = torch.randn(4, 70, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: linear_op(t, q, "torch"), (x,))


def test_autograd_reference_matches_dense_and_keeps_no_weight():
    q = random_qtensor(24, 100, mixed_bits(24), seed=3).to("cpu")
    x = torch.randn(6, 100, requires_grad=True)
    y = linear_op(x, q, "torch")
    # deq(W) is not kept for backward: only x and the stored codes, rows, codebooks and absmax
    saved = {tuple(t.shape) for t in y.grad_fn.saved_tensors if t is not None}
    assert (24, 100) not in saved and (100, 24) not in saved
    gy = torch.randn_like(y)
    y.backward(gy)
    w = _dense(q, torch.float32)
    torch.testing.assert_close(y, x.detach() @ w.t())
    torch.testing.assert_close(x.grad, gy @ w)


# ------------------------------------------------------------------------- Triton kernels
@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16, 40])
def test_forward_mixed(dtype, m):
    q = random_qtensor(70, 172, mixed_bits(70), seed=10 + m)
    x = torch.randn(m, 172).to(dtype).to(DEVICE)
    y = lut_matmul(x, q.packed(), backend="triton")
    assert y.dtype == dtype and y.shape == (m, 70)
    _check(y, x.cpu().double() @ _dense(q, torch.float64).to(dtype).double().t(), dtype)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [2, 33])
def test_backward_mixed(dtype, m):
    q = random_qtensor(70, 172, mixed_bits(70), seed=20 + m)
    gy = torch.randn(m, 70).to(dtype).to(DEVICE)
    gx = lut_matmul_backward(gy, q.packed(), backend="triton")
    assert gx.dtype == dtype and gx.shape == (m, 172)
    _check(gx, gy.cpu().double() @ _dense(q, torch.float64).to(dtype).double(), dtype)


@requires_triton
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 24])
def test_single_width_shared_codebook_double_quant(bits, m):
    q = random_qtensor(37, 130, bits, seed=bits, shared=True, double_quant=True)
    x = torch.randn(2, m, 130, device=DEVICE)  # 3-D activations
    y = lut_matmul(x, q.packed(), backend="triton")
    w = _dense(q)
    _check(y, x.cpu().double() @ w.t(), torch.float32)
    gx = lut_matmul_backward(torch.ones_like(y), q.packed(), backend="triton")
    _check(gx, torch.ones(2, m, 37, dtype=torch.float64) @ w, torch.float32)


@requires_triton
@pytest.mark.parametrize("m", [4, 20])
def test_autograd_function_triton(m):
    q = random_qtensor(48, 172, mixed_bits(48, (1, 2, 4)), seed=30 + m)
    x = torch.randn(m, 172, device=DEVICE, requires_grad=True)
    y = linear_op(x, q, "triton")
    gy = torch.randn_like(y)
    y.backward(gy)
    w = _dense(q)
    _check(y.detach(), x.detach().cpu().double() @ w.t(), torch.float32)
    _check(x.grad, gy.cpu().double() @ w, torch.float32)


@requires_triton
def test_output_fully_written_and_empty_batch():
    q = random_qtensor(70, 172, mixed_bits(70, (2, 4)), seed=40)
    for m in (1, 17):
        y = lut_matmul(torch.randn(m, 172, device=DEVICE), q.packed(), backend="triton")
        assert torch.isfinite(y).all()
    assert lut_matmul(torch.randn(0, 172, device=DEVICE), q.packed(), backend="triton").shape == (0, 70)
    with pytest.raises(ValueError):
        lut_matmul(torch.randn(2, 171, device=DEVICE), q.packed(), backend="triton")


# ------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_bf16_fp16_forward_backward(m, dtype):
    q = random_qtensor(1024, 2048 + 172, mixed_bits(1024, (1, 2, 4)), seed=50)
    w = _dense(q).to(dtype).double()
    x = torch.randn(m, 2048 + 172, device="cuda", dtype=dtype)
    _check(lut_matmul(x, q.packed(), "triton"), x.cpu().double() @ w.t(), dtype)
    gy = torch.randn(m, 1024, device="cuda", dtype=dtype)
    _check(lut_matmul_backward(gy, q.packed(), "triton"), gy.cpu().double() @ w, dtype)
    xg = x.clone().requires_grad_(True)
    linear_op(xg, q, "auto").backward(gy)
    _check(xg.grad, gy.cpu().double() @ w, dtype)


# ------------------------------------------------------------------------- GEMV rewrite (M ≤ 16)
def _sqnr_db(got: torch.Tensor, want: torch.Tensor) -> float:
    err = (got.double().cpu() - want).pow(2).sum().item()
    return 10 * torch.log10(torch.tensor(want.pow(2).sum().item() / max(err, 1e-300))).item()


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group_size", [16, 64, 128])
def test_gemv_one_hot_rows_are_bit_exact_dequantized_columns(dtype, group_size):
    """x = e_k makes every product but one zero: y[:, r] must equal deq(W)[r, k] bit for bit."""
    q = random_qtensor(45, 300, mixed_bits(45), seed=60 + group_size, group_size=group_size)
    want = q.to("cpu").dequantize(dtype, backend="torch")
    ks = [0, 9, 10, 31, 32, group_size - 1, group_size, 255, 299]
    x = torch.zeros(len(ks), 300, dtype=dtype)
    x[torch.arange(len(ks)), torch.tensor(ks)] = 1
    for m in (1, len(ks)):  # the M = 1 tile and the M ≤ 16 tile
        y = lut_matmul(x[:m].to(DEVICE), q.packed(), backend="triton").cpu()
        assert torch.equal(y, want[:, ks[:m]].t()), (m, group_size)


@requires_triton
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_gemv_sqnr_against_reference(bits, m):
    """Random x: the GEMV's fp32 sums agree with the reference to ≥ 100 dB (fp32 rounding only)."""
    q = random_qtensor(70, 1000, bits, seed=70 + bits + m)
    x = torch.randn(m, 1000)
    got = lut_matmul(x.to(DEVICE), q.packed(), backend="triton")
    want = x.double() @ _dense(q).t()
    assert _sqnr_db(got, want) >= 100.0


def test_gemv_helpers():
    from lowra_kernels.lut import UNALIGNED_WORDS as GEMV_UNALIGNED_WORDS
    from lowra_kernels.lut import gather_groups, gemv_k_step, gemv_step
    from lowra_kernels.lut_matmul import gemv_block_m, m_bucket

    assert [m_bucket(m) for m in (1, 2, 3, 16, 17, 300)] == [1, 2, 4, 16, 32, 512]
    assert [gemv_block_m(m) for m in (1, 2, 4, 5, 16)] == [1, 4, 4, 16, 16]
    with pytest.raises(ValueError):
        gemv_block_m(17)
    assert gemv_k_step(2, 64) == (4, 16, True)  # one 16-byte vector of words per row per step
    assert gemv_k_step(1, 64) == (2, 32, True)
    assert gemv_k_step(4, 4096) == (32, 8, True)  # steps stay inside one group (256 codes)
    assert gemv_k_step(3, 64) == (GEMV_UNALIGNED_WORDS, 16, False)  # 10 codes per word
    assert gemv_k_step(1, 16) == (GEMV_UNALIGNED_WORDS, 32, False)  # group smaller than a word
    # the GEMV's own step: 3/4-bit unaligned steps looked up by gather take the most words whose
    # codes touch at most 4 scale groups; aligned and 1/2-bit steps are gemv_k_step's
    assert gemv_step(3, 64) == (16, 16, False) and gather_groups(3, 16, False, 64) == 4  # 160 codes
    assert gemv_step(3, 128) == (16, 16, False) and gather_groups(3, 16, False, 128) == 4
    assert gemv_step(3, 256) == (16, 16, False) and gather_groups(3, 16, False, 256) == 2
    assert gemv_step(3, 16) == (4, 16, False) and gather_groups(3, 4, False, 16) == 4
    assert gemv_step(3, 8) == (GEMV_UNALIGNED_WORDS, 16, False) and gather_groups(3, 4, False, 8) == 0
    assert gemv_step(4, 64) == gemv_k_step(4, 64) and gather_groups(4, 8, True, 64) == 1
    assert gemv_step(2, 64) == gemv_k_step(2, 64) and gather_groups(2, 4, True, 64) == 0


@requires_triton
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gemv_every_kept_config(bits):
    """The interpreter autotunes over the first config only: run each GEMV config the compiled autotuner
    keeps for this width at M = 1 (split-K up to 8, 8-64-row tiles) through the kernel body directly."""
    from lowra_kernels import lut_matmul as lm
    from lowra_kernels.layout import codes_per_word
    from lowra_kernels.lut import gemv_step

    q = random_qtensor(70, 1000, bits, seed=90 + bits)
    w = q.packed()
    in_features, group_size, absmax = w.in_features, w.group_size, w.absmax
    g = w.groups()[0]
    words, pw2, aligned = gemv_step(bits, group_size)
    kept = lm.prune_gemv_configs(list(lm.GEMV_CONFIGS), {}, BITS=bits, BLOCK_M=1, WORDS=words, PW2=pw2,
                                 ALIGNED=aligned, GROUP=group_size)
    assert len(kept) >= 3
    x = torch.randn(1, in_features, device=DEVICE)
    want = x.double().cpu() @ _dense(q).t()
    for cfg in kept:
        split = cfg.kwargs["SPLIT_K"]
        ws = torch.full((split + 1, 1, 70), float("nan"), device=DEVICE)  # one extra slice: zeroed by the kernel
        _, codes, rows, codebook = g
        n = rows.numel()
        lm._lut_gemv_kernel.fn[(-(-n // cfg.kwargs["BLOCK_N"]), split)](
            x, codes, rows, codebook, absmax, ws, 1, n, in_features, split + 1,
            x.stride(0), codes.stride(0), codebook.stride(0), absmax.stride(0), absmax.stride(1),
            ws.stride(0), ws.stride(1), BITS=bits, PER_WORD=codes_per_word(bits), PW2=pw2, WORDS=words,
            ALIGNED=aligned, GROUP=group_size, BLOCK_M=1, **cfg.kwargs)
        assert _sqnr_db(ws.sum(0), want) >= 100.0, cfg.kwargs
