"""The C++ CPU backend (``lowra_kernels.cpu_backend``) against the PyTorch references.

dequantize and the M > 16 / non-fp32 matmuls are bit-exact with the references; the fused M ≤ 16
fp32 products are compared with an fp64 product (their summation order differs from BLAS).
"""

import warnings

import pytest
import torch
from kernel_testutils import linear_op, mixed_bits, random_qtensor

import lowra_kernels.cpu_backend as cpu
from lowra_kernels.dequantize import dequantize, dequantize_ref
from lowra_kernels.dispatch import use_cpu
from lowra_kernels.layout import num_groups
from lowra_kernels.lut_matmul import (
    lut_matmul,
    lut_matmul_backward,
    lut_matmul_backward_ref,
    lut_matmul_ref,
)
from lowra_kernels.pack import pack_ref

NAN = float("nan")


@pytest.fixture(scope="module", autouse=True)
def _built():
    if not cpu.available():  # a failed build is a test failure here, never a skip
        pytest.fail(f"the CPU extension did not build: {cpu.failure()}")


def _group(n, out_features, in_features, bits, seed, shared=False, group_size=64):
    gen = torch.Generator().manual_seed(seed)
    codes = pack_ref(torch.randint(0, 2**bits, (n, in_features), generator=gen), bits)
    rows = torch.randperm(out_features, generator=gen)[:n].to(torch.int32)
    cb = torch.randn(1 if shared else n, 2**bits, generator=gen).half()
    absmax = torch.rand(out_features, num_groups(in_features, group_size), generator=gen).half()
    return codes, rows, cb, absmax


def _same(a, b):
    return torch.equal(a.nan_to_num(12345.0), b.nan_to_num(12345.0))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(37, 172), (70, 256), (130, 9), (33, 1001)])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("group_size", [64, 24, 20])
def test_dequantize_bit_exact(bits, shape, shared, group_size):
    out_features, in_features = shape
    codes, rows, cb, absmax = _group(out_features - 3, out_features, in_features, bits,
                                     bits + out_features, shared, group_size)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = torch.full(shape, NAN, dtype=dtype)
        want = got.clone()
        dequantize(codes, rows, cb, absmax, bits, group_size, got, backend="cpu")
        dequantize_ref(codes, rows, cb, absmax, bits, group_size, want)
        assert _same(got, want), dtype
        assert torch.isnan(got).sum() == 3 * in_features  # rows of other widths untouched


def test_dequantize_strided_output():
    codes, rows, cb, absmax = _group(40, 40, 100, 2, 3)
    got = torch.full((100, 40), NAN).t()  # column-major [40, 100]
    want = torch.full((40, 100), NAN)
    dequantize(codes, rows, cb, absmax, 2, 64, got, backend="cpu")
    dequantize_ref(codes, rows, cb, absmax, 2, 64, want)
    assert _same(got, want)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(70, 172), (33, 1001), (16, 9)])
def test_mixed_widths_dequantize_auto_is_bit_exact(shape, double_quant):
    q = random_qtensor(*shape, mixed_bits(shape[0]), double_quant=double_quant)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(q.dequantize(dtype, backend="auto"), q.dequantize(dtype, backend="torch"))
        assert torch.equal(cpu.dequantize_weight_cpu(q.packed(), dtype), q.dequantize(dtype, backend="torch"))


def _fp64(q):
    return q.dequantize(torch.float64, backend="torch")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, None])
@pytest.mark.parametrize("shape", [(70, 172), (33, 1001), (130, 9)])
@pytest.mark.parametrize(("m", "group_size"), [(1, 64), (5, 64), (16, 64), (1, 20), (5, 20)])
def test_fused_small_m_matches_fp64(bits, shape, m, group_size):
    q = random_qtensor(*shape, bits if bits else mixed_bits(shape[0]), seed=m, group_size=group_size)
    w = _fp64(q)
    x = torch.randn(m, shape[1])
    gy = torch.randn(m, shape[0])
    y = lut_matmul(x, q.packed(), backend="cpu")
    gx = lut_matmul_backward(gy, q.packed(), backend="cpu")
    want_y, want_gx = x.double() @ w.t(), gy.double() @ w
    # fp32 accumulation over K terms: error well under 1e-5 of the magnitude scale
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=2e-5 * (shape[1] ** 0.5))
    torch.testing.assert_close(gx.double(), want_gx, rtol=1e-5, atol=2e-5 * (shape[0] ** 0.5))
    torch.testing.assert_close(y, lut_matmul_ref(x, q.packed()), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gx, lut_matmul_backward_ref(gy, q.packed()), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [17, 40])
def test_large_m_is_bit_exact(dtype, m):
    q = random_qtensor(70, 333, mixed_bits(70))
    x = torch.randn(2, m // 2 + 1, 333).to(dtype)
    gy = torch.randn(2, m // 2 + 1, 70).to(dtype)
    assert torch.equal(lut_matmul(x, q.packed(), backend="cpu"), lut_matmul_ref(x, q.packed()))
    assert torch.equal(lut_matmul_backward(gy, q.packed(), backend="cpu"), lut_matmul_backward_ref(gy, q.packed()))


def test_small_m_half_precision_is_bit_exact():
    q = random_qtensor(70, 172, mixed_bits(70))
    x = torch.randn(3, 172).to(torch.bfloat16)
    assert torch.equal(lut_matmul(x, q.packed(), backend="cpu"), lut_matmul_ref(x, q.packed()))


def test_autograd_and_lead_dims():
    q = random_qtensor(48, 200, mixed_bits(48))
    w = q.dequantize(torch.float32, backend="torch")
    for shape in ((1, 1, 200), (2, 5, 200), (4, 30, 200)):
        x = torch.randn(*shape, requires_grad=True)
        y = linear_op(x, q, "auto")
        assert y.shape == (*shape[:-1], 48)
        gy = torch.randn_like(y)
        y.backward(gy)
        torch.testing.assert_close(y, x.detach() @ w.t(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(x.grad, gy @ w, rtol=1e-5, atol=1e-4)


def test_same_result_for_any_thread_count():
    q = random_qtensor(2200, 1001, mixed_bits(2200))  # > 1M weights: the kernels split the work
    x, gy = torch.randn(4, 1001), torch.randn(4, 2200)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            w = q.packed()
            results.append((lut_matmul(x, w, backend="cpu"), lut_matmul_backward(gy, w, backend="cpu"),
                            q.dequantize(backend="cpu")))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, None])
@pytest.mark.parametrize("group_size", [64, 32, 24, 20])
def test_decode_gemv_is_bitwise_equal_at_1_and_2_threads(bits, group_size, monkeypatch):
    """The M = 1 fused GEMV (decode) splits a layer's output rows over threads; each row is computed by one
    thread in an order fixed by the weight alone, so 2 threads give the 1-thread result bit for bit."""
    monkeypatch.setattr(cpu, "GEMV_GRAIN", 4096)  # every layer here splits (at 2 threads)
    q = random_qtensor(301, 576, bits if bits else mixed_bits(301), seed=3, group_size=group_size)
    w = q.packed()
    x = torch.randn(1, 576)
    a, b = torch.randn(8, 576), torch.randn(301, 8)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append((cpu.lut_lora_gemv_cpu(x, w, None, None, 0.0), cpu.lut_lora_gemv_cpu(x, w, a, b, 0.5)))
    finally:
        torch.set_num_threads(threads)
    for got in results[1:]:
        assert torch.equal(got[0], results[0][0]) and torch.equal(got[1], results[0][1])
    torch.testing.assert_close(results[0][0].double(), x.double() @ _fp64(q).t(), rtol=1e-5, atol=1e-4)


def test_prepared_tables_follow_in_place_edits():
    q = random_qtensor(20, 64, 2)
    x = torch.randn(1, 64)
    w = q.packed()
    before = lut_matmul(x, w, backend="cpu")
    q.groups[0].codebook.mul_(2)
    after = lut_matmul(x, w, backend="cpu")
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, lut_matmul_ref(x, q.packed()), rtol=1e-5, atol=1e-5)


def test_prepared_tables_follow_new_codebook_tensors_even_at_a_reused_id():
    """A codebook cast anew each step (trainable tables) often lands at the id of last step's dead one:
    the cache must still see the new values (it holds what its key names, so ids cannot be reused)."""
    q = random_qtensor(24, 64, 2)
    x = torch.randn(1, 64)
    w = q.packed()
    for step in range(40):
        cb = (w.codebooks[0].float() * (1 + step)).half()
        ws = w._replace(codebooks=(cb,))
        got = lut_matmul(x, ws, backend="cpu")
        torch.testing.assert_close(got, lut_matmul_ref(x, ws), rtol=1e-4, atol=1e-4, msg=f"step {step}")
        del cb, ws


def test_bad_inputs_raise():
    q = random_qtensor(20, 64, 2)
    with pytest.raises(ValueError, match="features"):
        lut_matmul(torch.randn(2, 63), q.packed(), backend="cpu")
    with pytest.raises(ValueError, match="features"):
        lut_matmul_backward(torch.randn(2, 21), q.packed(), backend="cpu")
    with pytest.raises(ValueError, match="float"):
        lut_matmul(torch.ones(2, 64, dtype=torch.int64), q.packed(), backend="cpu")
    codes, rows, cb, absmax = _group(5, 5, 100, 2, 0)
    out = torch.empty(5, 100)
    with pytest.raises(ValueError, match="cannot hold"):
        dequantize(codes[:, :3], rows, cb, absmax, 2, 64, out, backend="cpu")
    with pytest.raises(ValueError, match="codebook"):
        dequantize(codes, rows, cb[:, :2], absmax, 2, 64, out, backend="cpu")
    with pytest.raises(ValueError, match="absmax"):
        dequantize(codes, rows, cb, absmax[:, :1], 2, 64, out, backend="cpu")
    with pytest.raises(ValueError, match="backend"):
        use_cpu("fast", out)


def test_failed_build_warns_once_and_runs_the_reference(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu, "_SOURCE", broken)
    monkeypatch.setattr(cpu, "_build_flags", lambda: ("lowra_cpu_broken_test", ["-O0"]))
    monkeypatch.setattr(cpu, "_state", "unloaded")
    monkeypatch.setattr(cpu, "_ext", None)
    monkeypatch.setattr(cpu, "_failure", "")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    q = random_qtensor(20, 64, mixed_bits(20))
    x = torch.randn(1, 64)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        y = lut_matmul(x, q.packed(), backend="auto")
    assert torch.equal(y, lut_matmul_ref(x, q.packed()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert torch.equal(q.dequantize(backend="auto"), q.dequantize(backend="torch"))
    with pytest.raises(RuntimeError, match="failed to build"):
        lut_matmul(x, q.packed(), backend="cpu")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, None])
@pytest.mark.parametrize(("m", "rank", "bias"), [(1, 8, False), (1, 0, True), (5, 3, True), (16, 16, False)])
def test_fused_lora_decode_matches_fp64(bits, m, rank, bias):
    out_features, in_features = 70, 172
    q = random_qtensor(out_features, in_features, bits if bits else mixed_bits(out_features), seed=rank)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(1, m, in_features, generator=gen)
    a = torch.randn(rank, in_features, generator=gen) if rank else None
    b = torch.randn(out_features, rank, generator=gen) if rank else None
    c = torch.randn(out_features, generator=gen) if bias else None
    y = cpu.lut_lora_gemv_cpu(x, q.packed(), a, b, 0.5, c)
    assert y.shape == (1, m, out_features)
    want = x.double() @ _fp64(q).t()
    if rank:
        want = want + 0.5 * (x.double() @ a.double().t()) @ b.double().t()
    if bias:
        want = want + c.double()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=2e-5 * (in_features ** 0.5))
    torch.testing.assert_close(y, cpu.lut_lora_gemv_ref(x, q.packed(), a, b, 0.5, c), rtol=1e-5, atol=1e-4)


def test_fused_lora_decode_refuses_what_it_cannot_do():
    q = random_qtensor(70, 172, 2)
    with pytest.raises(ValueError, match="1..16 rows"):
        cpu.lut_lora_gemv_cpu(torch.randn(17, 172), q.packed(), None, None, 1.0)
    with pytest.raises(ValueError, match="fp32 x"):
        cpu.lut_lora_gemv_cpu(torch.randn(2, 172).half(), q.packed(), None, None, 1.0)
    with pytest.raises(ValueError, match="lora_B must be contiguous fp32"):
        cpu.lut_lora_gemv_cpu(torch.randn(2, 172), q.packed(), torch.randn(4, 172), torch.randn(70, 5), 1.0)
    with pytest.raises(ValueError, match="the weight expects 172"):
        cpu.lut_lora_gemv_cpu(torch.randn(2, 171), q.packed(), None, None, 1.0)


def test_extension_name_is_keyed_by_the_source(monkeypatch, tmp_path):
    """Checkouts share torch's extension cache: a different source must build under a different name."""
    name, flags = cpu._build_flags()
    assert name.startswith("lowra_cpu_") and cpu._build_flags() == (name, flags)
    other = tmp_path / "cpu_backend.cpp"
    other.write_bytes(cpu._SOURCE.read_bytes() + b"\n// another checkout's version\n")
    monkeypatch.setattr(cpu, "_SOURCE", other)
    other_name, other_flags = cpu._build_flags()
    assert other_flags == flags and other_name != name
    assert other_name.rsplit("_", 1)[0] == name.rsplit("_", 1)[0]  # same family, another key


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """A build killed mid-way leaves ``lock`` behind and torch's ``load`` would wait on it forever."""
    import os

    from lowra_kernels.cpu_backend import STALE_LOCK_S, clear_stale_lock

    lock = tmp_path / "lock"
    assert not clear_stale_lock(tmp_path)  # no lock: nothing to do
    lock.touch()
    assert not clear_stale_lock(tmp_path) and lock.exists()  # a build in progress keeps its lock
    old = lock.stat().st_mtime - STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        assert clear_stale_lock(tmp_path)
    assert not lock.exists()
