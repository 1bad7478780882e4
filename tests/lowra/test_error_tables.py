"""Loss-aware and data-free error tables, Fisher calibration, the calibrated adapter init."""

from __future__ import annotations

import pytest
import torch

from experiments.eval.stories import load_model, token_splits
from lowra.adapter_init import ActivationWhitening, loftq_init
from lowra.calibration import calibration_windows, collect_fisher, collect_hessians
from lowra.codebook import learn_codebooks
from lowra.config import PAPER
from lowra.error_tables import calibration_statistics, measure_layer_losses, measured_row_table, row_error_table
from lowra.format import QuantizedTensor
from lowra.model_layers import lowra_layers
from lowra.model_quantization import quantize_model

FAST = {"codebook_iters": 5, "plan_options": {"clusters": 16, "samples": 0, "max_nodes": 200}, "progress": False}


@pytest.fixture(scope="module")
def windows():
    train, _ = token_splits()
    return calibration_windows(train, 8, 64, seed=0)


def _weight(out: int = 24, inp: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g)


def test_importance_weighted_error_is_exactly_what_is_stored():
    w = _weight()
    imp = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) ** 3
    res = learn_codebooks(w, bits=(1, 2, 4), group_size=32, importance=imp)
    for k, b in enumerate((1, 2, 4)):
        deq = QuantizedTensor.from_codebooks(w, b, res.codebooks, 32).dequantize(torch.float32)
        direct = (imp.double() * (w.double() - deq.double()) ** 2).sum(1)
        torch.testing.assert_close(res.error[:, k], direct, rtol=1e-5, atol=1e-9)


def test_unit_importance_is_the_plain_sse_and_weighted_fit_helps_the_weighted_error():
    w = _weight(seed=2)
    plain = learn_codebooks(w, bits=(2,), group_size=32)
    ones = learn_codebooks(w, bits=(2,), group_size=32, importance=torch.ones_like(w))
    torch.testing.assert_close(plain.error, ones.error)
    imp = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) ** 4
    data_free = learn_codebooks(w, bits=(2,), group_size=32, importance=imp)
    weighted = learn_codebooks(w, bits=(2,), group_size=32, importance=imp, weigh_codebooks=True)
    assert weighted.error.sum() < data_free.error.sum()


def test_bad_importance_is_refused():
    w = _weight()
    with pytest.raises(ValueError, match="importance must have the weight's shape"):
        learn_codebooks(w, bits=(2,), importance=torch.ones(3, 3))
    with pytest.raises(ValueError, match="finite and >= 0"):
        learn_codebooks(w, bits=(2,), importance=torch.full_like(w, float("nan")))


def test_relative_table_divides_by_the_layers_weight_energy():
    w = _weight()
    err = torch.rand(w.shape[0], 3, dtype=torch.float64)
    rel = row_error_table("relative", err, 10 * w)
    torch.testing.assert_close(rel * 100, row_error_table("relative", err, w))
    assert row_error_table("sse", err, w) is err
    with pytest.raises(ValueError, match="quant.error must be one of"):
        row_error_table("hessian", err, w)
    with pytest.raises(ValueError, match="error table must be"):
        row_error_table("sse", err[:3], w)


def test_collect_fisher_on_stories260k(windows):
    model = load_model()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    names = ["model.layers.0.self_attn.v_proj", "model.layers.4.mlp.down_proj"]
    fisher, hess = collect_fisher(model, windows.split(4), names, hessians=True)
    assert set(fisher) == set(names) and set(hess) == set(names)
    for n in names:
        f = fisher[n]
        assert f.shape == model.get_submodule(n).weight.shape and f.dtype == torch.float32
        assert torch.isfinite(f).all() and (f >= 0).all() and f.sum() > 0
    # one pass, same Hessians as the forward-only collector; nothing left trainable or with grads
    ref = collect_hessians(model, windows.split(4), names)
    for n in names:
        torch.testing.assert_close(hess[n], ref[n], rtol=1e-5, atol=1e-6)  # fp32 Grams per chunk
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    # a chunk's Fisher is the square of the loss gradient of that chunk
    f1, _ = collect_fisher(model, [windows[:4]], names[:1])
    model.zero_grad()
    model(input_ids=windows[:4], labels=windows[:4]).loss.backward()
    torch.testing.assert_close(f1[names[0]], model.get_submodule(names[0]).weight.grad ** 2)


def test_fisher_needs_data_and_finite_gradients(windows):
    model = load_model()
    toy = torch.nn.Sequential(torch.nn.Linear(64, 64))  # no BOS / generate(): no default calibration
    with pytest.raises(ValueError, match="quant.error=fisher needs calibration data.*pass calibration="):
        quantize_model(toy, 2, error="fisher", rank=2, alpha=4, target_modules=["0"], **FAST)
    with pytest.raises(ValueError, match="quant.init=calibrated needs calibration data"):
        quantize_model(toy, 2, error="sse", init="calibrated", rank=2, alpha=4, target_modules=["0"], **FAST)
    with pytest.raises(ValueError, match="quant.error must be one of"):
        quantize_model(model, 2, error="hessian", rank=2, alpha=4, **FAST)
    with pytest.raises(ValueError, match="error table of LowRA's planner"):
        quantize_model(model, 2, method="nf", error="fisher", rank=2, alpha=4, calibration=windows, **FAST)
    assert not lowra_layers(model)
    name = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        model.get_submodule("model.embed_tokens").weight[windows[0, 0]] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite gradient"):
        calibration_statistics(model, [name], windows, 4, fisher=True, hessians=False)


def test_fisher_plan_moves_bits_to_small_norm_layers(windows):
    """The SSE plan starves v_proj/o_proj (small norms); the Fisher plan gives them more bits."""
    avg = {}
    for error in ("sse", "fisher"):
        model = load_model()
        data = {"calibration": windows, "calibration_batch_size": 4} if error == "fisher" else {}
        rep = quantize_model(model, 2, error=error, rank=2, alpha=4, loftq_iters=0, **data, **FAST)
        assert rep.error_table == error and abs(rep.bits_nominal - 2.0) < 0.01
        avg[error] = {k: sum(lr.nominal_bits for lr in rep.layers if k in lr.name) / 5 for k in ("v_proj", "o_proj")}
    assert avg["fisher"]["v_proj"] > avg["sse"]["v_proj"]


def test_activation_whitening_and_calibrated_init_beats_loftq_in_the_activation_norm():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(512, 64, generator=g) * torch.logspace(0, -2, 64)  # anisotropic inputs
    h = (x.T @ x / x.shape[0]).double()
    wh = ActivationWhitening(h, damp=0.01)
    eye = torch.eye(64)
    torch.testing.assert_close(wh.sqrt @ wh.inv_sqrt, eye, atol=1e-3, rtol=0)

    def quant(m):
        return QuantizedTensor.from_codebooks(m, 2, learn_codebooks(m, bits=(2,), group_size=32).codebooks, 32)

    plain = loftq_init(w, quant, 4, 8.0, iters=1)
    cal = loftq_init(w, quant, 4, 8.0, iters=1, hessian=h)
    plain_act = wh.error(w - plain.qweight.dequantize(torch.float32) - 2.0 * plain.lora_B @ plain.lora_A)
    assert cal.act_error < 0.9 * plain_act
    assert cal.sse > plain.sse  # it trades Frobenius error for activation error
    # H = I: the calibrated fit is LoftQ's (up to the tiny damping)
    iso = loftq_init(w, quant, 4, 8.0, iters=1, hessian=torch.eye(64, dtype=torch.float64), damp=1e-6)
    torch.testing.assert_close(2.0 * iso.lora_B @ iso.lora_A, 2.0 * plain.lora_B @ plain.lora_A, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="hessian must be"):
        loftq_init(w, quant, 4, 8.0, iters=1, hessian=torch.eye(3))


def test_calibrated_init_through_quantize_model(windows):
    model = load_model()
    rep = quantize_model(model, 2, init="calibrated", error="fisher", rank=2, alpha=4, calibration=windows,
                         calibration_batch_size=4, **FAST)
    assert rep.init == "calibrated" and rep.error_table == "fisher" and "calibration_s" in rep.times
    d = rep.to_dict()
    assert d["init"] == "calibrated" and d["error_table"] == "fisher" and d["budget_kind"] == "nominal"


def test_measured_row_table_is_monotone_and_splits_by_share():
    inc = torch.tensor([2.0, 0.5, -0.01], dtype=torch.float64)
    err = torch.tensor([[3.0, 1.0, 0.2], [1.0, 1.0, 0.0]], dtype=torch.float64)
    table = measured_row_table(inc, err, (1, 2, 4))
    torch.testing.assert_close(table.sum(0), torch.tensor([2.0, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(table[:, 0], torch.tensor([1.5, 0.5], dtype=torch.float64))
    # a wider code never costs more than a narrower one
    up = measured_row_table(torch.tensor([0.1, 0.3, 0.2], dtype=torch.float64), err, (1, 2, 4))
    assert up.sum(0).tolist() == pytest.approx([0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="row_error must be"):
        measured_row_table(inc, err[:, :2], (1, 2, 4))


def test_measure_layer_losses_restores_weights_and_orders_widths(windows):
    model = load_model()
    names = ["model.layers.0.self_attn.v_proj", "model.layers.2.mlp.up_proj"]
    layers = [(n, model.get_submodule(n)) for n in names]
    before = {n: m.weight.detach().clone() for n, m in layers}
    cbs = {n: learn_codebooks(m.weight.detach(), bits=(1, 4), group_size=64).codebooks for n, m in layers}

    def deq(name, linear, b):
        return QuantizedTensor.from_codebooks(linear.weight.detach(), b, {b: cbs[name][b]}, 64).dequantize()

    base, inc = measure_layer_losses(model, layers, deq, (1, 4), windows[:4], 2)
    assert base > 0 and inc.shape == (2, 2)
    assert (inc[:, 0] > inc[:, 1]).all() and (inc[:, 0] > 0).all()
    for n, m in layers:
        assert torch.equal(m.weight, before[n])


def test_measured_table_through_quantize_model(windows):
    model = load_model()
    rep = quantize_model(model, 1.5, error="measured", rank=2, alpha=4, loftq_iters=0, calibration=windows,
                         calibration_batch_size=4, measure_windows=4, **FAST)
    assert rep.error_table == "measured" and len(rep.layer_loss_increase) == 35
    assert "measure_s" in rep.times and abs(rep.bits_nominal - 1.5) < 0.01


def test_effective_budget_counts_every_stored_bit():
    """budget_kind=effective: the plan's stored bits (codes, codebooks, scales, index) meet +bits."""
    from lowra.format import row_storage_bits

    model = load_model()
    rep = quantize_model(model, 2.7, budget_kind="effective", rank=2, alpha=4, loftq_iters=0,
                         **{**PAPER, "candidates": (1, 2, 3, 4)}, **FAST)
    assert rep.budget_kind == "effective"
    assert 2.65 <= rep.bits_effective <= 2.7 + 1e-9 and rep.bits_nominal < 2.0
    layer = lowra_layers(model)[0][1]
    rows = layer.qweight.bits_per_row.tolist()
    stored = sum(row_storage_bits(layer.in_features, b, 64) for b in rows)
    assert stored == 8 * layer.qweight.nbytes  # fp16 scales: the cost model is exact
    with pytest.raises(ValueError, match=r"budget_kind is a LowRA option; method='nf' does not take it"):
        quantize_model(load_model(), 2, method="nf", budget_kind="effective", **FAST)
    with pytest.raises(ValueError, match="budget_kind=effective needs method='lowra' with a precision plan"):
        quantize_model(load_model(), 2, budget_kind="effective", plan="uniform", **FAST)
    with pytest.raises(ValueError, match="quant.budget_kind=effective, bits=1.5"):
        quantize_model(load_model(), 1.5, budget_kind="effective", rank=2, alpha=4, loftq_iters=0, **PAPER, **FAST)


def test_kfac_row_errors_in_row_chunks_equal_one_pass(monkeypatch):
    """Row chunks (bounded temporaries) give the table of one pass over the whole weight, double quant too."""
    import lowra.error_tables as et
    from lowra.codebook import learn_codebooks as learn
    from lowra.format import dequantized_at

    g = torch.Generator().manual_seed(1)
    w = torch.randn(37, 128, generator=g)
    x = torch.randn(256, 128, generator=g)
    h = (x.T @ x / 256).double()
    gsq = torch.rand(37, generator=g).double()
    for dq in (False, True):
        books = learn(w, bits=(1, 2), group_size=64, double_quant=dq, iters=2).codebooks
        whole = et.kfac_row_errors(w, books, (1, 2), 64, dq, gsq, h)
        monkeypatch.setattr(et, "KFAC_CHUNK_ELEMENTS", 5 * 128)  # 5 rows per chunk
        chunked = et.kfac_row_errors(w, books, (1, 2), 64, dq, gsq, h)
        monkeypatch.undo()
        torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)  # GEMM blocking differs by rows
        d = w - dequantized_at(w, 2, books[2], 64, dq)
        torch.testing.assert_close(whole[:, 1], gsq * ((d.double() @ h) * d.double()).sum(1), rtol=1e-5, atol=0)
