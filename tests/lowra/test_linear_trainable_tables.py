"""LowRALinear with trainable codebooks / scales: frozen default unchanged, gradients, stored tables."""

from __future__ import annotations

import copy

import pytest
import torch

from lowra.codebook import learn_codebooks
from lowra.format import QuantizedTensor
from lowra.linear import LowRALinear
from lowra.model_layers import train_base_tables


def _layer(double_quant: bool = False, seed: int = 0) -> LowRALinear:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 96, generator=gen) * 0.05
    cb = learn_codebooks(w, bits=(1, 2, 4), group_size=32, iters=5)
    bits = torch.tensor([1, 2, 4])[torch.arange(24) % 3]
    qt = QuantizedTensor.from_codebooks(w, bits, cb.codebooks, group_size=32, double_quant=double_quant)
    torch.manual_seed(seed)
    m = LowRALinear(qt, bias=torch.randn(24), rank=4, alpha=8.0)
    with torch.no_grad():
        m.lora_B.normal_()
    return m


def _run(m: LowRALinear, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    y = m(x)
    y.pow(2).sum().backward()
    return y.detach(), [x.grad, m.lora_A.grad, m.lora_B.grad]


def test_trainable_tables_at_init_are_bit_identical_to_the_frozen_default():
    frozen, trained = _layer(), _layer()
    new = trained.train_base_tables(codebooks=True, scales=True)
    assert len(new) == len(trained.qweight.groups) + 1 and all(p.dtype == torch.float32 for p in new)
    assert [n for n, _ in frozen.named_parameters()] == ["lora_A", "lora_B"]  # frozen default: nothing new
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(1))
    y0, g0 = _run(frozen, x)
    y1, g1 = _run(trained, x)
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in new)
    with torch.no_grad():  # the no-grad path reads the same tables
        assert torch.equal(frozen(x), trained(x))


def test_gradients_train_the_tables_and_the_stored_fp16_tables_follow():
    m = _layer()
    params = m.train_base_tables(codebooks=True, scales=True)
    opt = torch.optim.SGD(params, lr=1e-2)
    x = torch.randn(8, 96, generator=torch.Generator().manual_seed(2))
    target = torch.randn(8, 24, generator=torch.Generator().manual_seed(3))
    before = [p.detach().clone() for p in params]
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (m(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    live = [g for g in m.qweight.groups if g.rows.numel()]
    for g, p in zip(live, params[:-1]):
        assert g.codebook.dtype == torch.float16 and torch.equal(g.codebook, p.detach().half())
    assert torch.equal(m.qweight.scales.absmax, params[-1].detach().half())
    with torch.no_grad():  # a frozen layer built from the synced QuantizedTensor computes the same outputs
        plain = LowRALinear(m.qweight, bias=m.bias, rank=4, alpha=8.0, lora_A=m.lora_A, lora_B=m.lora_B)
        assert torch.equal(plain(x), m(x))


def test_state_dict_keeps_its_keys_and_loads_strictly():
    m = _layer()
    keys = set(m.state_dict())
    m.train_base_tables(codebooks=True, scales=True)
    assert set(m.state_dict()) == keys
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        "lora_A", "lora_B", "trainable_absmax", *(f"trainable_codebooks.{j}" for j in range(3))}
    m.load_state_dict(copy.deepcopy(m.state_dict()), strict=True)


def test_bad_requests_name_the_problem():
    with pytest.raises(ValueError, match="double_quant"):
        _layer(double_quant=True).train_base_tables(scales=True)
    m = _layer()
    m.train_base_tables(codebooks=True)
    with pytest.raises(ValueError, match="already trainable"):
        m.train_base_tables(codebooks=True)
    dense = LowRALinear(torch.randn(8, 16), rank=2)
    assert dense.train_base_tables(codebooks=True) == []


def test_model_helper_names_the_new_parameters():
    model = torch.nn.Sequential(_layer(seed=0), torch.nn.ReLU(), _layer(seed=1))
    model[2] = LowRALinear(model[2].qweight, rank=2)  # different shapes do not matter: names do
    new = train_base_tables(model, codebooks=True)
    assert sorted(new) == sorted([f"{i}.trainable_codebooks.{j}" for i in (0, 2) for j in range(3)])
    assert dict(model.named_parameters())["0.trainable_codebooks.1"] is new["0.trainable_codebooks.1"]


def test_compile_fullgraph_with_trainable_codebooks():
    m = _layer()
    m.train_base_tables(codebooks=True)
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(4))
    want, _ = _run(m, x)
    grads = [p.grad.clone() for p in m.trainable_codebooks]
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    xx = x.clone().requires_grad_(True)
    y = compiled(xx)
    y.pow(2).sum().backward()
    torch.testing.assert_close(y.detach(), want)
    for g, p in zip(grads, m.trainable_codebooks):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("tokens", [5, 40])  # the fused CPU GEMV forward (M ≤ 16) and the dequantize + matmul one
@pytest.mark.parametrize("dropout", [0.0, 0.1])  # 0.1: the adapters run outside the op
def test_one_bit_codebook_gradient_from_the_kept_output_matches_the_reference(tokens, dropout):
    """The 1-bit rows' codebook gradient computed from the forward's output (bias and adapters taken
    off; ``lowra_kernels.codebook_grad.one_bit_codebook_grad``) equals the reference backend's ∂L/∂W
    segment sums to fp32 rounding; the other widths and every other gradient are unchanged."""
    from lowra_kernels.cpu_backend import available, failure

    if not available():  # a failed build is a test failure, never a skip (the fast path is under test)
        pytest.fail(f"the CPU extension did not build: {failure()}")
    fast, ref = _layer(), _layer()
    for m in (fast, ref):
        m.lora_dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        m.train_base_tables(codebooks=True)
    ref.backend = "torch"
    x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    y0, g0 = _run(fast, x)
    torch.manual_seed(0)
    y1, g1 = _run(ref, x)
    torch.testing.assert_close(y0, y1, rtol=1e-4, atol=1e-4)  # the backends sum in another order
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for p, q in zip(fast.trainable_codebooks, ref.trainable_codebooks):
        # the 1-bit closed form reads the fp32 output, whose bias and adapter parts (large in this layer:
        # B ~ N(0, 1)) cancel: a relative error of a few 1e-4 here (6e-5 at most on stories260K's layers)
        assert float((p.grad - q.grad).norm() / q.grad.norm()) < 2e-3


@pytest.mark.parametrize("rows", [8, 40])  # the fused GEMV (M <= 16) and the dequantize + GEMM path
def test_every_step_computes_with_the_current_tables(rows):
    """The CPU kernels' per-weight caches must follow the tables each step (the op casts the parameters
    anew every call, and a new tensor may take the id of last step's): the CPU backend equals the
    PyTorch reference after every optimizer step, in grad mode and without."""
    m = _layer()
    params = m.train_base_tables(codebooks=True, scales=True)
    opt = torch.optim.SGD(params, lr=0.5)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(4))
    for step in range(6):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
        for grad_mode in (True, False):
            with torch.set_grad_enabled(grad_mode):
                m.backend = "cpu"
                got = m(x).detach()
                m.backend = "torch"
                want = m(x).detach()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"step {step} grad {grad_mode}")
