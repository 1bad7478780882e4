"""∂L/∂codebook and ∂L/∂absmax (lowra_kernels.codebook_grad): the chunked reference against autograd
on a dense float64 reconstruction of the weight, the Triton kernel (interpreter, shapes ≤ 256) and the
fused C++ CPU path (every width of a layer, one pass per width and row chunk) against the reference."""

from __future__ import annotations

import pytest
import torch
from kernel_testutils import mixed_bits, random_qtensor, requires_triton

from lowra_kernels.codebook_grad import (
    codebook_grad,
    codebook_grad_cpu,
    codebook_grad_ref,
    codebook_grad_triton,
    layer_table_grads,
)
from lowra_kernels.unpack import unpack_ref


def _problem(out_f, in_f, shared, group_size=64, seed=0, tokens=37):
    qt = random_qtensor(out_f, in_f, mixed_bits(out_f, seed=seed), seed=seed, shared=shared,
                        group_size=group_size).to("cpu")
    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(tokens, in_f, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(tokens, out_f, generator=gen, dtype=torch.float64)
    return qt, x, grad_out


def _autograd(qt, x, grad_out):
    """Gradients of ⟨grad_out, x Wᵀ⟩ w.r.t. each group's codebook and the absmax, W rebuilt densely."""
    absmax = qt.scales.restore().double().requires_grad_(True)
    books = [g.codebook.double().requires_grad_(True) for g in qt.groups]
    w = torch.zeros(qt.shape, dtype=torch.float64)
    for g, cb in zip(qt.groups, books, strict=True):
        idx = unpack_ref(g.codes, g.bits, qt.shape[1])
        values = cb[0][idx] if cb.shape[0] == 1 else torch.gather(cb, 1, idx)
        rows = g.rows.long()
        scale = absmax[rows].repeat_interleave(qt.group_size, dim=1)[:, : qt.shape[1]]
        w = w.index_put((rows,), values * scale)
    loss = (grad_out * (x @ w.t())).sum()
    grads = torch.autograd.grad(loss, [*books, absmax])
    return grads[:-1], grads[-1]


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize(("out_f", "in_f", "group_size"), [(24, 200, 64), (40, 128, 32), (9, 70, 16)])
def test_reference_matches_autograd_float64(out_f, in_f, group_size, shared):
    qt, x, grad_out = _problem(out_f, in_f, shared, group_size)
    want_cb, want_a = _autograd(qt, x, grad_out)
    absmax = qt.scales.restore().double()
    got_a = torch.full_like(absmax, float("nan"))
    for g, want in zip(qt.groups, want_cb, strict=True):
        g_cb, g_a = codebook_grad_ref(grad_out, x, g.codes, g.rows, g.codebook.double(), absmax, g.bits,
                                      qt.group_size, row_chunk=3)  # several chunks
        torch.testing.assert_close(g_cb, want, rtol=1e-11, atol=1e-11)
        got_a[g.rows.long()] = g_a
    torch.testing.assert_close(got_a, want_a, rtol=1e-11, atol=1e-11)  # every row written once


def test_chunking_does_not_change_the_result():
    qt, x, grad_out = _problem(33, 96, False, 32)
    absmax = qt.scales.restore()
    for g in qt.groups:
        args = (grad_out.float(), x.float(), g.codes, g.rows, g.codebook, absmax, g.bits, qt.group_size)
        one = codebook_grad_ref(*args, row_chunk=10_000)
        many = codebook_grad_ref(*args, row_chunk=2)
        # the same sums; only the BLAS blocking of the [chunk, M] × [M, in] product differs
        torch.testing.assert_close(one[0], many[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(one[1], many[1], rtol=1e-5, atol=1e-4)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize(("out_f", "in_f", "group_size"), [(40, 256, 64), (17, 100, 32), (64, 48, 16)])
def test_triton_matches_reference(out_f, in_f, group_size, shared, dtype):
    qt, x, grad_out = _problem(out_f, in_f, shared, group_size, tokens=45)
    absmax = qt.scales.restore()
    x, grad_out = x.to(dtype), grad_out.to(dtype)
    for g in qt.groups:
        for need in (True, False):
            want = codebook_grad_ref(grad_out, x, g.codes, g.rows, g.codebook, absmax, g.bits, qt.group_size, need)
            got = codebook_grad_triton(grad_out, x, g.codes, g.rows, g.codebook, absmax, g.bits, qt.group_size,
                                       need)
            torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
            if need:
                torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
            else:
                assert got[1] is None and want[1] is None


def test_dispatch_and_bad_input():
    qt, x, grad_out = _problem(8, 64, False)
    g, absmax = qt.groups[0], qt.scales.restore()
    ref = codebook_grad_ref(grad_out, x, g.codes, g.rows, g.codebook, absmax, g.bits, qt.group_size)
    got = codebook_grad(grad_out, x, g.codes, g.rows, g.codebook, absmax, g.bits, qt.group_size, backend="torch")
    assert torch.equal(ref[0], got[0])
    with pytest.raises(ValueError, match=r"grad_out \[M, out\] and x \[M, in\]"):
        codebook_grad_ref(grad_out[:3], x, g.codes, g.rows, g.codebook, absmax, g.bits, qt.group_size)
    with pytest.raises(ValueError, match="codebook must be"):
        codebook_grad_ref(grad_out, x, g.codes, g.rows, g.codebook[:, :1], absmax, g.bits, qt.group_size)
    with pytest.raises(ValueError, match="power-of-two group_size"):
        codebook_grad_triton(grad_out, x, g.codes, g.rows, g.codebook, absmax, g.bits, 48)


def _requires_cpu_ext():
    from lowra_kernels.cpu_backend import available

    if not available():
        pytest.skip("the C++ CPU extension does not build here")


@pytest.mark.parametrize("double_quant", [False, True])  # fp16-stored absmax, or the fp32 restore
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize(("out_f", "in_f", "group_size", "row_chunk"),
                         [(24, 200, 64, None), (40, 128, 32, 7), (9, 70, 16, 2), (13, 90, 12, 5)])
def test_cpu_fused_matches_reference(out_f, in_f, group_size, row_chunk, shared, double_quant):
    """Every width of a mixed 1–4-bit layer in one call: per-row and shared tables, partial last groups,
    a group size that is no multiple of 8, several row chunks; codebook sums and absmax sums."""
    _requires_cpu_ext()
    qt = random_qtensor(out_f, in_f, mixed_bits(out_f, seed=3), seed=3, shared=shared, group_size=group_size,
                        double_quant=double_quant).to("cpu")
    gen = torch.Generator().manual_seed(11)
    x, grad_out = torch.randn(29, in_f, generator=gen), torch.randn(29, out_f, generator=gen)
    absmax = qt.scales.restore() if double_quant else qt.scales.absmax
    groups = qt.groups
    for need_cb in ([True] * len(groups), [j % 2 == 0 for j in range(len(groups))]):
        for need_a in (True, False):
            got_cb, got_a = codebook_grad_cpu(grad_out, x, [g.codes for g in groups], [g.rows for g in groups],
                                              [g.codebook for g in groups], absmax, [g.bits for g in groups],
                                              qt.group_size, need_cb, need_a, row_chunk=row_chunk)
            want_a = torch.full((out_f, absmax.shape[1]), float("nan"))
            for j, g in enumerate(groups):
                ref_cb, ref_a = codebook_grad_ref(grad_out.double(), x.double(), g.codes, g.rows, g.codebook,
                                                  absmax, g.bits, qt.group_size)
                want_a[g.rows.long()] = ref_a.float()
                if need_cb[j]:
                    torch.testing.assert_close(got_cb[j], ref_cb.float(), rtol=1e-4, atol=1e-4)
                    assert got_cb[j].shape == g.codebook.shape and got_cb[j].dtype == torch.float32
                else:
                    assert got_cb[j] is None
            if need_a:
                torch.testing.assert_close(got_a, want_a, rtol=1e-4, atol=1e-4)
            else:
                assert got_a is None


def test_cpu_dispatch_single_width_and_layer():
    """``codebook_grad(backend="cpu")`` and ``layer_table_grads`` run the fused path and agree with the
    reference; float64 stays on the reference (bit for bit)."""
    _requires_cpu_ext()
    qt, x, grad_out = _problem(20, 96, False, 32)
    absmax = qt.scales.restore()
    xf, gf = x.float(), grad_out.float()
    g_cbs, g_a = layer_table_grads(gf, xf, [g.codes for g in qt.groups], [g.rows for g in qt.groups],
                                   [g.codebook for g in qt.groups], absmax, [g.bits for g in qt.groups],
                                   qt.group_size, [True] * len(qt.groups), True, backend="cpu")
    for j, g in enumerate(qt.groups):
        ref = codebook_grad_ref(gf, xf, g.codes, g.rows, g.codebook, absmax, g.bits, qt.group_size)
        one = codebook_grad(gf, xf, g.codes, g.rows, g.codebook, absmax, g.bits, qt.group_size, backend="cpu")
        torch.testing.assert_close(one[0], ref[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(one[1], ref[1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(g_cbs[j], ref[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(g_a[g.rows.long()], ref[1], rtol=1e-4, atol=1e-4)
        d64 = codebook_grad(grad_out, x, g.codes, g.rows, g.codebook.double(), absmax.double(), g.bits,
                            qt.group_size, backend="cpu")
        r64 = codebook_grad_ref(grad_out, x, g.codes, g.rows, g.codebook.double(), absmax.double(), g.bits,
                                qt.group_size)
        assert d64[0].dtype == torch.float64 and torch.equal(d64[0], r64[0])


@pytest.mark.parametrize("backend", ["cpu", "torch"])  # "torch": the exact reference for every row
@pytest.mark.parametrize("shared", [False, True])
def test_one_bit_rows_from_the_output_row_dot(shared, backend):
    """1-bit rows without ∂L/∂W (``base_dot`` + ``row_sums``) equal the reference, with degenerate rows
    (equal entries, an all-zero codebook) sent to the exact path; other widths unchanged."""
    if backend == "cpu":
        _requires_cpu_ext()
    qt, x, grad_out = _problem(30, 100, shared, 32)
    x, grad_out = x.float(), grad_out.float()
    groups = qt.groups
    books = [g.codebook.clone() for g in groups]
    one = next(j for j, g in enumerate(groups) if g.bits == 1)
    if not shared:  # row 0: cb0 = cb1 (no closed form), row 1: both zero
        books[one][0] = books[one][0, 0]
        books[one][1] = 0
    absmax = qt.scales.restore()
    w = torch.zeros(qt.shape)
    for g, cb in zip(groups, books, strict=True):
        from lowra_kernels.dequantize import dequantize_ref

        dequantize_ref(g.codes, g.rows, cb, absmax, g.bits, qt.group_size, w)
    base_dot = (grad_out * (x @ w.t())).sum(0)
    got, g_a = layer_table_grads(grad_out, x, [g.codes for g in groups], [g.rows for g in groups], books, absmax,
                                 [g.bits for g in groups], qt.group_size, [True] * len(groups), False, backend,
                                 base_dot=base_dot)
    assert g_a is None
    for j, g in enumerate(groups):
        want, _ = codebook_grad_ref(grad_out.double(), x.double(), g.codes, g.rows, books[j], absmax.double(), g.bits,
                                    qt.group_size)
        assert torch.isfinite(got[j]).all()
        torch.testing.assert_close(got[j], want.float(), rtol=2e-4, atol=2e-4)
