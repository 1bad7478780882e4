"""LowRALinear: forward/backward against a dense reference, memory discipline, checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lowra.codebook import learn_codebooks
from lowra.format import QuantizedTensor
from lowra.linear import LowRALinear


def _qt(out_features: int = 48, in_features: int = 100, seed: int = 0) -> tuple[torch.Tensor, QuantizedTensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen) * 0.05
    cb = learn_codebooks(w, bits=(1, 2, 4), group_size=32, iters=5)
    bits = torch.tensor([1, 2, 4])[torch.arange(out_features) % 3]
    return w, QuantizedTensor.from_codebooks(w, bits, cb.codebooks, group_size=32)


def _module(rank: int = 4, alpha: float = 8.0, bias: bool = True, dropout: float = 0.0) -> LowRALinear:
    torch.manual_seed(0)
    _, qt = _qt()
    b = torch.randn(qt.out_features) if bias else None
    m = LowRALinear(qt, bias=b, rank=rank, alpha=alpha, dropout=dropout)
    with torch.no_grad():
        m.lora_B.normal_()  # non-zero B so the adapter path is exercised
    return m


def _reference(m: LowRALinear, x: torch.Tensor) -> torch.Tensor:
    w = m.qweight.dequantize(torch.float64) + m.scaling * (m.lora_B.double() @ m.lora_A.double())
    out = x.double() @ w.T
    return out + m.bias.double() if m.bias is not None else out


def test_forward_matches_dense_reference():
    m = _module()
    x = torch.randn(3, 7, m.in_features)
    y = m(x)
    assert y.shape == (3, 7, m.out_features) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _reference(m, x), rtol=1e-4, atol=1e-4)
    # the merged weight is the same linear map
    torch.testing.assert_close(y, x @ m.merged_weight().T + m.bias, rtol=1e-4, atol=1e-4)


def test_backward_grad_input_and_adapters_only():
    m = _module()
    x = torch.randn(5, m.in_features, dtype=torch.float64, requires_grad=True)
    x32 = x.detach().float().requires_grad_(True)
    m(x32).pow(2).sum().backward()
    _reference(m, x).pow(2).sum().backward()
    torch.testing.assert_close(x32.grad.double(), x.grad, rtol=1e-3, atol=1e-3)
    assert m.lora_A.grad is not None and m.lora_B.grad is not None
    assert m.bias.grad is None and not m.bias.requires_grad
    assert [n for n, p in m.named_parameters()] == ["lora_A", "lora_B"]


def test_no_copy_of_base_weight_is_saved_for_backward():
    m = _module(rank=2)
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor):
        saved.append(tuple(t.shape))
        return t

    x = torch.randn(4, m.in_features, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    assert (m.out_features, m.in_features) not in saved, saved
    assert (m.in_features, m.out_features) not in saved, saved
    y.sum().backward()
    assert x.grad is not None


def test_no_grad_inference_and_gradient_checkpointing():
    m = _module()
    x = torch.randn(2, 6, m.in_features, requires_grad=True)
    with torch.no_grad():
        y0 = m(x)
    assert not y0.requires_grad
    y = m(x)
    torch.testing.assert_close(y0, y.detach())
    y.square().mean().backward()
    grads = [x.grad.clone(), m.lora_A.grad.clone(), m.lora_B.grad.clone()]
    x.grad = m.lora_A.grad = m.lora_B.grad = None
    checkpoint(m, x, use_reentrant=False).square().mean().backward()
    for g, h in zip(grads, [x.grad, m.lora_A.grad, m.lora_B.grad]):
        torch.testing.assert_close(g, h)


def test_dense_base_rank_zero_dtype_and_device_moves():
    w = torch.randn(8, 16)
    dense = LowRALinear(w, rank=2, alpha=4)  # plain LoRA: B = 0 → output equals the base
    x = torch.randn(3, 16)
    torch.testing.assert_close(dense(x), x @ w.T)
    assert "dense" in dense.extra_repr() and dense.nominal_bits == 32
    _, qt = _qt()
    plain = LowRALinear(qt, rank=0)
    assert plain.lora_A is None and list(plain.parameters()) == []
    torch.testing.assert_close(plain(torch.eye(qt.in_features)), qt.dequantize().T)
    m = _module().to(torch.float64)  # codes/codebooks keep their dtype; activations follow
    assert m.qweight.groups[0].codebook.dtype == torch.float16 and m.lora_A.dtype == torch.float64
    assert m(torch.randn(2, m.in_features, dtype=torch.float64)).dtype == torch.float64
    assert m.to("cpu").qweight.device.type == "cpu"


def test_extra_repr_and_dropout():
    m = _module(rank=4, dropout=0.5)
    text = repr(m)
    assert "bits=2.33" in text and "rank=4" in text and "1b×16" in text
    x = torch.randn(64, m.in_features)
    m.train()
    assert not torch.allclose(m(x), m(x))  # dropout on the adapter path is active
    m.eval()
    torch.testing.assert_close(m(x), m(x))


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": -1}, "rank"),
    ({"dropout": 1.0}, "dropout"),
    ({"bias": torch.zeros(3)}, "bias"),
])
def test_bad_arguments(kwargs, match):
    _, qt = _qt()
    with pytest.raises(ValueError, match=match):
        LowRALinear(qt, **kwargs)


def test_bad_adapter_shapes():
    _, qt = _qt()
    with pytest.raises(ValueError, match="lora_A"):
        LowRALinear(qt, rank=2, lora_A=torch.zeros(3, qt.in_features))


def test_decode_runs_one_fused_cpu_call(monkeypatch):
    """A decode-sized fp32 call is one extension call (GEMV + adapters + bias), with or without grad."""
    import lowra_kernels.lut_linear as op

    calls = []
    fused = op.lut_lora_gemv_cpu
    monkeypatch.setattr(op, "lut_lora_gemv_cpu",
                        lambda *a, **k: calls.append((a[0].shape, a[2] is not None)) or fused(*a, **k))
    m = _module(dropout=0.1)
    x = torch.randn(1, 3, m.in_features)
    with torch.no_grad():
        m.train()
        y_train = m(x)  # active dropout: the adapters run outside the op
        m.eval()
        y = m(x)
        m(torch.randn(2, 9, m.in_features))  # 18 rows > 16: dequantize + BLAS
    assert calls == [((1, 3, m.in_features), False), ((1, 3, m.in_features), True)]
    assert y.shape == (1, 3, m.out_features) and not y.requires_grad
    torch.testing.assert_close(y.double(), _reference(m, x), rtol=1e-4, atol=1e-4)
    assert not torch.equal(y_train, y)
    xg = x.clone().requires_grad_(True)
    m(xg).sum().backward()  # grad enabled: the same fused forward, the op's backward
    assert len(calls) == 3 and xg.grad is not None and m.lora_A.grad is not None
