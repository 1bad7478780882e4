"""``torch.ops.lowra.lut_linear`` / ``lut_grad_input`` / ``dequantize``: opcheck, gradients, backends."""

import pytest
import torch
from kernel_testutils import linear_op, mixed_bits, random_qtensor

import lowra_kernels.lut_linear  # registers torch.ops.lowra.*
from lowra_kernels.lut_linear import lut_linear_ref

OUT, IN, RANK = 12, 70, 3
WIDTHS = [1, 2, 3, 4, "mixed"]


def _weight(bits, seed: int = 0):
    return random_qtensor(OUT, IN, mixed_bits(OUT) if bits == "mixed" else bits, seed=seed, group_size=32)


def _args(q, dtype, adapters: bool, bias: bool, m: int = 3, grad: bool = True, backend: str = "auto"):
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(2, m, IN, generator=gen).to(dtype).requires_grad_(grad)
    a = torch.randn(RANK, IN, generator=gen).requires_grad_(grad) if adapters else None
    b = torch.randn(OUT, RANK, generator=gen).requires_grad_(grad) if adapters else None
    c = torch.randn(OUT, generator=gen).to(dtype) if bias else None
    tensors, meta = q.packed().op_args()
    return x, tensors, a, b, c, meta, 0.5, backend


FAST_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")
ALL_CHECKS = (*FAST_CHECKS, "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", WIDTHS)
def test_opcheck_every_width_and_dtype(bits, dtype):
    """Schema, autograd registration and fake tensors for every width and dtype; the AOT-dispatch check
    (compiles forward and backward, ~2 s a case) for mixed widths in every dtype."""
    q = _weight(bits)
    torch.library.opcheck(torch.ops.lowra.lut_linear.default, _args(q, dtype, adapters=True, bias=True),
                          test_utils=ALL_CHECKS if bits == "mixed" else FAST_CHECKS)


@pytest.mark.parametrize(("adapters", "bias", "m"), [(False, False, 1), (False, True, 3), (True, False, 20)])
def test_opcheck_without_adapters_or_bias(adapters, bias, m):
    q = _weight("mixed", seed=1)
    torch.library.opcheck(torch.ops.lowra.lut_linear.default, _args(q, torch.float32, adapters, bias, m=m))


def test_opcheck_companion_ops():
    q = random_qtensor(OUT, IN, mixed_bits(OUT), double_quant=True)
    weight = q.packed().op_args()
    gy = torch.randn(4, OUT, requires_grad=True)
    torch.library.opcheck(torch.ops.lowra.lut_grad_input.default, (gy, *weight, "auto"))
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.lowra.dequantize.default, (*weight, dtype, "auto"))
    assert torch.equal(torch.ops.lowra.dequantize(*weight, torch.float32, "auto"), q.dequantize(torch.float32))


def test_gradcheck_float64_reference():
    """fp64 through the reference: the registered backward is the derivative (x, adapters, bias)."""
    q = _weight("mixed", seed=2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, IN, dtype=torch.float64, generator=gen, requires_grad=True)
    a = torch.randn(2, IN, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(OUT, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    c = torch.randn(OUT, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: linear_op(t[0], q, "torch", *t[1:], scaling=0.7), (x, a, b, c),
                                    fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda t: linear_op(t, q, "torch"), (x,), fast_mode=True)


@pytest.mark.parametrize("m", [1, 5, 16, 40])
def test_backends_agree_with_the_reference_and_frozen_base_gets_no_grad(m):
    q = _weight("mixed", seed=3)
    args = _args(q, torch.float32, adapters=True, bias=True, m=m)
    x, a, b, c = args[0], args[2], args[3], args[4]
    y = torch.ops.lowra.lut_linear(*args[:-1], "cpu")
    want = lut_linear_ref(x, q.packed(), a, b, c, 0.5)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, b), gy, retain_graph=True)
    want_grads = torch.autograd.grad(want, (x, a, b), gy)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    y.backward(gy)
    assert all(g.codebook.grad is None for g in q.groups)  # not requiring grad: frozen, nothing computed


def _dense(tensors: list[torch.Tensor], meta: list[int]) -> torch.Tensor:
    """``deq(W)`` in fp64 built differentiably from the codebooks and absmax (the autograd reference)."""
    from lowra_kernels.unpack import unpack_ref

    n, gs, k = len(meta) - 2, meta[0], meta[1]
    absmax = tensors[3 * n].double().repeat_interleave(gs, dim=1)[:, :k]
    w = torch.zeros(absmax.shape, dtype=torch.float64)
    for j in range(n):
        codes, rows, cb = tensors[j], tensors[n + j].long(), tensors[2 * n + j].double()
        idx = unpack_ref(codes, meta[2 + j], k)
        vals = cb[0][idx] if cb.shape[0] == 1 else torch.gather(cb, 1, idx)
        w = w.index_put((rows,), vals * absmax[rows])
    return w


@pytest.mark.parametrize("shared", [False, True])
def test_codebook_and_absmax_grads_match_autograd_of_the_dense_weight(shared):
    """Trainable codebooks / scales: the op's backward (``codebook_grad``) equals autograd through
    ``x · deq(W)ᵀ`` built from the tables in fp64."""
    q = random_qtensor(OUT, IN, mixed_bits(OUT), seed=4, shared=shared, group_size=32)
    tensors, meta = q.packed().op_args()
    n = len(meta) - 2
    tables = [t.detach().float().requires_grad_(True) for t in tensors[2 * n:]]
    op_tensors = [*tensors[:2 * n], *(t.half() for t in tables[:-1]), tables[-1].to(tensors[-1].dtype)]
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(1))
    gy = torch.randn(2, 5, OUT, generator=torch.Generator().manual_seed(2))
    y = torch.ops.lowra.lut_linear(x, op_tensors, None, None, None, meta, 1.0, "auto")
    got = torch.autograd.grad(y, tables, gy)
    ref_tables = [t.detach().half().double().requires_grad_(True) for t in tables]
    dense = _dense([*tensors[:2 * n], *ref_tables], meta)
    want = torch.autograd.grad((x.double() @ dense.T), ref_tables, gy.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=2e-3, atol=2e-3)


def test_opcheck_with_trainable_codebooks_and_absmax():
    q = _weight("mixed", seed=5)
    x, tensors, a, b, c, meta, s, backend = _args(q, torch.float32, adapters=True, bias=True)
    n = len(meta) - 2
    tensors = [*tensors[:2 * n], *(t.detach().clone().requires_grad_(True) for t in tensors[2 * n:])]
    torch.library.opcheck(torch.ops.lowra.lut_linear.default, (x, tensors, a, b, c, meta, s, backend),
                          test_utils=ALL_CHECKS)


def test_bad_arguments_name_the_problem():
    q = _weight(2)
    args = list(_args(q, torch.float32, adapters=True, bias=True, grad=False))
    with pytest.raises(ValueError, match="features"):
        torch.ops.lowra.lut_linear(args[0][..., :-1], *args[1:])
    with pytest.raises(ValueError, match="adapters"):
        torch.ops.lowra.lut_linear(*args[:2], args[2][:, :-1], *args[3:])
    with pytest.raises(ValueError, match="together"):
        torch.ops.lowra.lut_linear(*args[:3], None, *args[4:])
    with pytest.raises(ValueError, match="bias"):
        torch.ops.lowra.lut_linear(*args[:4], args[4][:-1], *args[5:])
    with pytest.raises(ValueError, match="widths"):
        torch.ops.lowra.lut_linear(args[0], args[1][:-1], *args[2:])
    with pytest.raises(ValueError, match="backend"):
        torch.ops.lowra.lut_linear(*args[:-1], "fast")


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("m", [1, 16, 40])
def test_eager_autograd_path_equals_the_op_bitwise(m, backend):
    """``lut_linear_autograd`` (the eager grad-mode path, no dispatcher) gives the op's output and gradients
    exactly — same forward implementation, same backward function — for the fused GEMV (M ≤ 16) and the
    transient + BLAS regime, a bias that requires grad included; double backward still works through it."""
    from lowra_kernels.lut_linear import lut_linear_autograd
    from lowra_kernels.weight import PackedWeight

    q = _weight("mixed", seed=6)
    x, tensors, a, b, c, meta, s, _ = _args(q, torch.float32, adapters=True, bias=True, m=m)
    c.requires_grad_(True)
    gy = torch.randn(x.shape[:-1] + (OUT,), generator=torch.Generator().manual_seed(7))
    y_op = torch.ops.lowra.lut_linear(x, tensors, a, b, c, meta, s, backend)
    g_op = torch.autograd.grad(y_op, (x, a, b, c), gy)
    y = lut_linear_autograd(x, PackedWeight.from_op_args(tensors, meta), tensors, meta, a, b, c, s, backend)
    g = torch.autograd.grad(y, (x, a, b, c), gy, create_graph=True)
    assert torch.equal(y, y_op)
    for got, want in zip(g, g_op):
        assert torch.equal(got, want)
    (gg,) = torch.autograd.grad(g[0].square().sum(), (b,))  # through lut_grad_input's own backward
    assert gg is not None and gg.abs().sum() > 0


@pytest.mark.parametrize("variant", ["stored", "shared_fp32_absmax", "int64_rows_fp32_codebooks"])
def test_cpu_kernel_is_cpp_and_gives_the_eager_path_bits(variant, monkeypatch):
    """With the extension loaded, ``lowra::lut_linear``'s CPU kernel is the C++ one (no Python per call under
    torch.compile); for the decode case it returns the eager path's bits, for the rest it runs the fallback."""
    import lowra_kernels.cpu_backend as cpu
    from lowra_kernels.lut_linear import lut_linear_forward
    from lowra_kernels.weight import PackedWeight

    if not cpu.available():
        pytest.fail(f"the CPU extension did not build: {cpu.failure()}")
    assert "cpu_backend.cpp" in torch._C._dispatch_dump("lowra::lut_linear").split("\nCPU: ")[1].split("\n")[0]
    q = random_qtensor(OUT, IN, mixed_bits(OUT), seed=1, shared=variant == "shared_fp32_absmax",
                       double_quant=variant == "shared_fp32_absmax", group_size=32)
    w = q.packed()
    if variant == "int64_rows_fp32_codebooks":
        w = w._replace(rows=tuple(r.long() for r in w.rows), codebooks=tuple(c.float() for c in w.codebooks))
    tensors, meta = w.op_args()
    w = PackedWeight.from_op_args(tensors, meta)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(RANK, IN, generator=gen), torch.randn(OUT, RANK, generator=gen)
    c = torch.randn(OUT, generator=gen)
    cases = [(torch.randn(1, IN, generator=gen), a, b, c, "auto"),
             (torch.randn(2, 5, IN, generator=gen), None, None, c, "cpu"),
             (torch.randn(3, IN, generator=gen), a, b, None, "auto"),
             (torch.randn(20, IN, generator=gen), a, b, c, "auto"),  # M > 16: fallback
             (torch.randn(2, IN, generator=gen).half(), None, None, None, "auto"),  # fp16: fallback
             (torch.randn(2, IN, generator=gen), a, b, c, "torch")]  # the reference: fallback
    want = [lut_linear_forward(x, w, la, lb, bias, 0.5, backend) for x, la, lb, bias, backend in cases]
    for k, (x, la, lb, bias, backend) in enumerate(cases):
        with monkeypatch.context() as patch:
            if k < 3:  # the decode cases run in C++: the Python implementation is never called
                patch.setattr(lowra_kernels.lut_linear, "lut_linear_forward", None)
            got = torch.ops.lowra.lut_linear(x, tensors, la, lb, bias, meta, 0.5, backend)
        assert torch.equal(got, want[k]), (tuple(x.shape), backend)
    with pytest.raises(ValueError, match="features"):
        torch.ops.lowra.lut_linear(torch.randn(1, IN + 1), tensors, None, None, None, meta, 0.5, "auto")
