"""LoftQ init: W ≈ deq(Q) + (alpha/r)·B·A, residual below plain quantization, monotone in T."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lowra.adapter_init import loftq_init, low_rank_factors
from lowra.codebook import learn_codebooks
from lowra.format import QuantizedTensor
from lowra.quantizers import quantize

ASSETS = Path(os.environ.get("LOWRA_ASSETS") or Path(__file__).resolve().parents[2].parent / "shared" / "assets")
MODEL = ASSETS / "models" / "stories260K"


def _fixed_quantizer(w: torch.Tensor, bits: torch.Tensor, group_size: int = 64):
    """LowRA's LoftQ quantizer: per-row codebooks and widths learned once, then fixed."""
    cb = learn_codebooks(w, bits=(1, 2, 4), group_size=group_size, iters=5)
    return lambda m: QuantizedTensor.from_codebooks(m, bits, cb.codebooks, group_size)


def _residual(w: torch.Tensor, result, alpha: float, rank: int) -> float:
    delta = 0 if result.lora_A is None else (alpha / rank) * result.lora_B @ result.lora_A
    return float((w - result.qweight.dequantize() - delta).double().pow(2).sum())


def test_scale_is_accounted_for_when_alpha_differs_from_rank():
    """s·B·A must equal the best rank-r fit of the residual (PEFT's LoftQ forgets 1/s)."""
    torch.manual_seed(0)
    w = torch.randn(40, 96)
    bits = torch.full((40,), 2)
    for rank, alpha in [(4, 16.0), (8, 2.0), (4, 4.0)]:
        r = loftq_init(w, _fixed_quantizer(w, bits), rank=rank, alpha=alpha, iters=1)
        residual = w - r.qweight.dequantize()
        s = torch.linalg.svdvals(residual.double())
        tail = float(s[rank:].pow(2).sum())
        assert r.sse == pytest.approx(tail, rel=1e-4)
        assert _residual(w, r, alpha, rank) == pytest.approx(tail, rel=1e-4)
        # balanced factors: both carry √(Σ/s)
        torch.testing.assert_close(r.lora_A.norm(), r.lora_B.norm(), rtol=1e-4, atol=1e-6)


def test_low_rank_factors_shapes():
    a, b = low_rank_factors(torch.randn(10, 30), 3, 2.0)
    assert a.shape == (3, 30) and b.shape == (10, 3)


def test_iters_zero_is_plain_quantization_with_standard_init():
    w = torch.randn(16, 64)
    r = loftq_init(w, lambda m: quantize(m, 2, method="nf"), rank=4, alpha=8, iters=0)
    assert r.lora_A is None and r.lora_B is None and r.best_iter == 0
    assert r.sse == r.sse_quant == pytest.approx(_residual(w, r, 8, 4), rel=1e-6)


def test_codebooks_and_widths_stay_fixed_in_the_loop():
    torch.manual_seed(1)
    w = torch.randn(24, 64)
    bits = torch.tensor([1, 2, 4])[torch.arange(24) % 3]
    cb = learn_codebooks(w, bits=(1, 2, 4), iters=10)
    qfn = lambda m: QuantizedTensor.from_codebooks(m, bits, cb.codebooks, 64)  # noqa: E731
    r = loftq_init(w, qfn, rank=2, alpha=16, iters=4)
    assert torch.equal(r.qweight.bits_per_row.long(), bits)
    for g in r.qweight.groups:
        expected = cb.codebooks[g.bits][g.rows.long()].half().sort(dim=1).values
        assert torch.equal(g.codebook, expected)


@pytest.mark.parametrize("method", [
    "lowra-fixed",
    pytest.param("nf", marks=pytest.mark.slow),
    pytest.param("uniform", marks=pytest.mark.slow),
])
def test_every_stories260k_layer_improves_and_never_grows_with_T(method):
    """For every target layer of the real model: LoftQ residual < plain residual, monotone in T."""
    from safetensors.torch import load_file

    state = load_file(str(MODEL / "model.safetensors"))
    layers = {k: v for k, v in state.items() if k.endswith("proj.weight")}
    assert len(layers) == 35
    gen = torch.Generator().manual_seed(0)
    for name, w in layers.items():
        if method == "lowra-fixed":
            bits = torch.tensor([1, 2, 4])[torch.randint(0, 3, (w.shape[0],), generator=gen)]
            qfn = _fixed_quantizer(w, bits)
        else:
            qfn = lambda m, method=method: quantize(m, 2, method=method)  # noqa: E731
        previous = None
        for iters in (1, 3):
            r = loftq_init(w, qfn, rank=2, alpha=16, iters=iters, name=name)
            assert r.sse < r.sse_quant, (name, iters)
            assert _residual(w, r, 16, 2) == pytest.approx(r.sse, rel=1e-4, abs=1e-6)
            if previous is not None:
                assert r.sse <= previous + 1e-9, (name, iters, r.history)
            previous = r.sse


def test_bad_input_names_the_layer():
    w = torch.randn(8, 64)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="model.layers.0.q_proj"):
        loftq_init(w, lambda m: quantize(m, 2, method="nf"), 2, 16, name="model.layers.0.q_proj")
    with pytest.raises(ValueError, match="rank"):
        loftq_init(torch.randn(8, 64), lambda m: quantize(m, 2, method="nf"), 9, 16)
    with pytest.raises(ValueError, match="iters"):
        loftq_init(torch.randn(8, 64), lambda m: quantize(m, 2, method="nf"), 2, 16, iters=-1)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_low_rank_factors_equal_the_truncated_svd(shape):
    """The top-r triplets from the smaller Gram give the SVD's best rank-r fit (Eckart-Young)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape[0], 4, generator=g) @ torch.randn(4, shape[1], generator=g) * 3
    residual = base + 0.1 * torch.randn(*shape, generator=g)
    rank, scaling = 6, 2.0
    a, b = low_rank_factors(residual, rank, scaling)
    U, S, Vh = torch.linalg.svd(residual.double(), full_matrices=False)
    best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    fit = scaling * (b.double() @ a.double())
    assert float((fit - best).norm() / best.norm()) < 1e-5
    # balanced factors: ‖A‖ = ‖B‖ per direction, both σ / s in squared norm
    assert torch.allclose(a.double().norm(dim=1) ** 2, S[:rank] / scaling, rtol=1e-5)
    assert torch.allclose(b.double().norm(dim=0) ** 2, S[:rank] / scaling, rtol=1e-5)


def test_low_rank_factors_of_a_rank_deficient_residual_are_finite():
    residual = torch.zeros(8, 12)
    residual[0, :] = 1.0  # rank 1, asked for rank 4
    a, b = low_rank_factors(residual, 4, 1.0)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert torch.allclose(b @ a, residual, atol=1e-6)
    a0, b0 = low_rank_factors(torch.zeros(5, 7), 2, 1.0)
    assert not a0.any() and not b0.any()
