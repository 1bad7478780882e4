"""quantize_model on the real stories260K model and on tiny random Mistral / BART configs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from experiments.eval.stories import finetune, load_model, perplexity, token_splits
from lowra.config import PAPER
from lowra.linear import LowRALinear
from lowra.model_layers import find_target_linears, lora_parameters, lowra_layers
from lowra.model_memory import memory_report
from lowra.model_quantization import quantize_model
from lowra.report import QuantizationReport

#: the paper preset (data-free: these tests quantize without calibration text), few iterations, a quick plan
FAST = {**PAPER, "codebook_iters": 5, "plan_options": {"clusters": 16, "samples": 0, "max_nodes": 200},
        "progress": False}


@pytest.fixture(scope="module")
def splits():
    train, heldout = token_splits()
    return train, heldout[:2048]


@pytest.fixture(scope="module")
def model_2bit():
    model = load_model()
    report = quantize_model(model, 2.0, rank=2, alpha=16, loftq_iters=1, **FAST)
    return model, report


def _check_budget(model: nn.Module, report: QuantizationReport, bits: float) -> None:
    layers = lowra_layers(model)
    assert len(layers) == 35 and len(report.layers) == 35
    rows = [(int(m.qweight.bits_per_row.long().sum()) * m.in_features, m.out_features * m.in_features)
            for _, m in layers]
    average = sum(r for r, _ in rows) / sum(n for _, n in rows)
    assert average == pytest.approx(report.bits_nominal, rel=1e-9)
    assert average == pytest.approx(report.plan["average_bits"], rel=1e-9)
    max_row = max(m.in_features for _, m in layers)
    assert bits - max_row / sum(n for _, n in rows) - 1e-9 <= average <= bits + 1e-9
    assert report.bits_effective > report.bits_nominal
    for layer, (_, m) in zip(report.layers, layers):
        assert sum(layer.bits_histogram.values()) == m.out_features
        assert layer.sse_loftq <= layer.sse_quant


def _generate(model: nn.Module) -> torch.Tensor:
    prompt = torch.tensor([[1, 403, 407, 261, 378]])  # "Once upon a time" in tok512
    out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 13)
    return out


def test_quantize_at_115_bits_plan_budget_and_generation(splits):
    model = load_model()
    report = quantize_model(model, 1.15, rank=2, alpha=16, **FAST)
    _check_budget(model, report, 1.15)
    assert set(report.layers[0].bits_histogram) <= {1, 2, 4}
    assert report.times["codebooks_s"] > 0 and report.times["plan_s"] > 0
    _generate(model)
    assert torch.isfinite(torch.tensor(perplexity(model, splits[1])))
    json.dumps(report.to_dict())
    # embeddings and lm_head stay in full precision; only adapters train
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    assert {n.rsplit(".", 2)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert len(lora_parameters(model)) == 70


@pytest.mark.slow
@pytest.mark.parametrize("bits, max_ppl", [(2.0, 1000.0), (4.0, 8.0)])
def test_quantize_at_2_and_4_bits(bits, max_ppl, splits):
    """NormalFloat 2-bit is ≈ 2,300 here (docs/design.md "Experimental protocol": ≈ 5,800 without LoftQ)."""
    model = load_model()
    report = quantize_model(model, bits, rank=2, alpha=16, **FAST)
    _check_budget(model, report, bits)
    # a per-row plan can only beat storing every row at the integer width itself
    assert report.plan["objective"] <= report.plan["sse_uniform"][int(bits)] * (1 + 1e-6)
    assert report.total_sse_quant == pytest.approx(report.plan["objective"], rel=1e-3)
    _generate(model)
    assert perplexity(model, splits[1]) < max_ppl


def test_4_bit_lowra_is_close_to_fp32(splits):
    """Few layers, quick: at 4 bits the learned codebooks barely move the perplexity."""
    model = load_model()
    fp32 = perplexity(model, splits[1])
    quantize_model(model, 4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], **FAST)
    assert perplexity(model, splits[1]) < fp32 * 1.1


@pytest.mark.parametrize("method", ["nf", "uniform"])
def test_integer_methods_through_the_same_api(method, splits):
    model = load_model()
    report = quantize_model(model, 4, method=method, rank=2, alpha=16, progress=False, **PAPER)
    assert report.bits_nominal == 4.0 and report.method == method
    assert all(m.qweight.method == method for _, m in lowra_layers(model))
    assert perplexity(model, splits[1]) < 9.0


def test_method_none_is_plain_lora_with_identical_logits():
    model = load_model()
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        before = model(x).logits
    report = quantize_model(model, 16, method="none", rank=2, alpha=16, loftq_iters=1, progress=False)
    assert report.bits_target is None and report.bits_nominal == 32
    m = model.model.layers[0].self_attn.q_proj
    assert isinstance(m, LowRALinear) and not m.is_quantized and torch.count_nonzero(m.lora_B) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)


def test_loftq_zero_is_standard_lora_init(model_2bit):
    model = load_model()
    quantize_model(model, 2.0, rank=2, alpha=16, loftq_iters=0, target_modules=["q_proj"], **FAST)
    for _, m in lowra_layers(model):
        assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0


def test_finetune_50_steps_lowers_heldout_loss(model_2bit, splits):
    model = copy.deepcopy(model_2bit[0])
    train, heldout = splits
    before = perplexity(model, heldout)
    losses = finetune(model, train, steps=50, lr=3e-3, batch_size=8, seq_len=128)
    after = perplexity(model, heldout)
    assert after < before * 0.97, (before, after)
    assert sum(losses[-10:]) < sum(losses[:10])
    # the base did not move: codes are frozen, only adapters changed
    for (_, a), (_, b) in zip(lowra_layers(model), lowra_layers(model_2bit[0])):
        assert torch.equal(a.qweight.groups[0].codes, b.qweight.groups[0].codes)


def test_gradient_checkpointing_gives_the_same_gradients(model_2bit):
    model = copy.deepcopy(model_2bit[0])
    x = torch.randint(0, 512, (2, 32))

    def grads():
        model.zero_grad(set_to_none=True)
        model.train()
        model(x, labels=x).loss.backward()
        return [p.grad.clone() for p in lora_parameters(model)]

    plain = grads()
    model.gradient_checkpointing_enable()
    ckpt = grads()
    assert all(g is not None for g in ckpt)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_memory_report(model_2bit):
    model, report = model_2bit
    mem = memory_report(model)
    codes = sum(g.codes.numel() * 4 for _, m in lowra_layers(model) for g in m.qweight.groups)
    assert mem["codes"] == codes
    assert mem["adapters"] == sum(p.numel() * 4 for p in lora_parameters(model))
    assert mem["bits_nominal"] == pytest.approx(report.bits_nominal)
    assert mem["bits_effective"] == pytest.approx(report.bits_effective)
    assert mem["optimizer_state"] == 8 * mem["trainable_params"]
    assert mem["model_total_other_bf16"] < mem["compare"]["bf16"]["model_total"]
    json.dumps(mem)


# ---------------------------------------------------------------------------------- other models
def _tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return MistralForCausalLM(config).eval()


def test_tiny_mistral_fractional_budget():
    model = _tiny_mistral()
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(x).logits
    report = quantize_model(model, 1.5, rank=4, alpha=8, loftq_iters=2, **FAST)
    assert len(report.layers) == 14 and report.bits_nominal <= 1.5 + 1e-9
    with torch.no_grad():
        out = model(x).logits
    assert out.shape == ref.shape and torch.isfinite(out).all()
    model.generate(x[:1, :4], max_new_tokens=4, do_sample=False)


def test_tiny_bart_encoder_decoder():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    model = BartForConditionalGeneration(config).eval()
    report = quantize_model(model, 2, rank=2, alpha=4, **FAST)
    # q/k/v/out_proj of encoder self-attn, decoder self- and cross-attn (12) + fc1/fc2 × 2 layers (4)
    assert len(report.layers) == 16
    assert isinstance(model.lm_head, nn.Linear)
    x = torch.randint(3, 96, (2, 10))
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert all(p.grad is not None for p in lora_parameters(model))


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bits", [0.5, 4.5, float("nan")])
def test_bits_outside_range(bits):
    with pytest.raises(ValueError, match="bit budget"):
        quantize_model(_tiny_mistral(), bits, progress=False)


def test_fractional_bits_need_lowra():
    with pytest.raises(ValueError, match="fractional"):
        quantize_model(_tiny_mistral(), 2.5, method="nf", progress=False)
    with pytest.raises(ValueError, match="unknown quantization method"):
        quantize_model(_tiny_mistral(), 2, method="bogus", progress=False)


def test_unknown_target_module():
    model = _tiny_mistral()
    with pytest.raises(ValueError, match="'qq_proj' matches no nn.Linear"):
        quantize_model(model, 2, target_modules=["q_proj", "qq_proj"], progress=False)
    assert not lowra_layers(model)  # nothing was modified


def test_nan_weight_names_the_layer():
    model = _tiny_mistral()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj"):
        quantize_model(model, 2, progress=False)
    assert not lowra_layers(model)


def test_already_quantized_and_targets():
    model = _tiny_mistral()
    names = [n for n, _ in find_target_linears(model, r".*layers\.0\.self_attn\.[qk]_proj")]
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert "lm_head" not in [n for n, _ in find_target_linears(model, None)]
    assert [n for n, _ in find_target_linears(model, ["lm_head"])] == ["lm_head"]
    quantize_model(model, 4, method="nf", target_modules=["q_proj"], progress=False)
    with pytest.raises(ValueError, match="already"):
        quantize_model(model, 4, method="nf", progress=False)


# ------------------------------------------------------------- issue 7 wiring: OPTQ calibration, ablations
@pytest.fixture(scope="module")
def calibration(splits):
    from lowra.calibration import calibration_windows

    return calibration_windows(splits[0], 16, 64, seed=0)


def test_optq_with_calibration_uses_each_layers_hessian(calibration):
    from lowra.calibration import collect_hessians
    from lowra.quantizers import quantize
    from lowra.quantizers.optq import optq_quantize, output_error

    model = load_model()
    hessians = collect_hessians(model, calibration.split(8))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"]
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    report = quantize_model(model, 3, method="optq", rank=2, alpha=4, loftq_iters=0, calibration=calibration,
                            calibration_batch_size=8, progress=False)
    assert report.bits_nominal == 3.0 and len(report.layers) == 35 and "calibration_s" in report.times
    for n in names:
        w, h = weights[n], hessians[n]
        got = model.get_submodule(n).qweight.dequantize()
        # exactly OPTQ with THIS layer's Hessian from the full-precision model
        assert torch.equal(got, optq_quantize(w, 3, h).dequantized)
        rtn = quantize(w, 3, method="uniform").dequantize()
        assert output_error(w, got, h) < output_error(w, rtn, h)


def test_optq_without_calibration_names_the_argument():
    """Without ``calibration=`` the library samples windows from the model (``lowra.sample_windows``);
    a model that cannot generate (no BOS token, no ``generate``) gets a ValueError naming the argument."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"'optq'.*calibration="):
        quantize_model(model, 3, method="optq", rank=2, alpha=4, loftq_iters=0, target_modules=["0", "2"],
                       progress=False)
    assert not lowra_layers(model)  # nothing was swapped


def test_layer_options_override_quant_options(calibration):
    from lowra.calibration import collect_hessians

    model = load_model()
    name = "model.layers.0.self_attn.q_proj"
    h = collect_hessians(model, calibration.split(8), [name])[name]
    report = quantize_model(model, 2, method="optq", rank=2, alpha=4, loftq_iters=0, target_modules=[name],
                            layer_options={name: {"hessian": h}}, progress=False)
    assert report.bits_nominal == 2.0 and "calibration_s" in report.times


def test_nf_codebook_ablation_is_no_better_than_learned():
    results = {}
    for codebook in ("learned", "nf"):
        model = load_model()
        results[codebook] = quantize_model(model, 2.0, rank=0, loftq_iters=0, codebook=codebook, **FAST)
    assert results["nf"].plan and results["nf"].bits_nominal == pytest.approx(2.0, abs=0.01)  # plan still on
    assert results["nf"].total_sse_quant >= results["learned"].total_sse_quant


def test_uniform_plan_ablation():
    model = load_model()
    report = quantize_model(model, 2, rank=0, loftq_iters=0, plan="uniform", **FAST)
    assert not report.plan and all(layer.bits_histogram.keys() == {2} for layer in report.layers)
    with pytest.raises(ValueError, match=r"plan='uniform'.*fractional"):
        quantize_model(load_model(), 1.5, rank=0, plan="uniform", **FAST)
    for bad in ({"plan": "greedy"}, {"codebook": "uniform"}):
        with pytest.raises(ValueError, match="must be"):
            quantize_model(load_model(), 2, rank=0, **bad, **FAST)


def test_three_bit_candidates():
    model = load_model()
    report = quantize_model(model, 2.5, rank=0, loftq_iters=0, **{**FAST, "candidates": (1, 2, 3, 4)})
    assert report.candidates == (1, 2, 3, 4) and report.bits_nominal <= 2.5 + 1e-9


def test_low_bits_init_applies_below_its_threshold_only():
    """low_bits_init: a code-bit budget below ``below`` gets its init (the same model as those options
    set directly); at or above it, the config's own loftq_iters / init_codebooks."""
    low = {"below": 2.0, "loftq_iters": 3, "init_codebooks": "relearn"}

    def run(bits: float, **kw):
        model = load_model()
        report = quantize_model(model, bits, rank=2, **{**FAST, **kw})
        return report, {n: m.qweight.dequantize(torch.float32) for n, m in model.named_modules()
                        if isinstance(m, LowRALinear)}

    ruled, ruled_w = run(1.5, loftq_iters=1, low_bits_init=low)
    direct, direct_w = run(1.5, loftq_iters=3, init_codebooks="relearn")
    assert ruled.low_bits_init and (ruled.loftq_iters, ruled.init_codebooks) == (3, "relearn")
    assert all(torch.equal(ruled_w[n], direct_w[n]) for n in direct_w)
    assert ruled.total_sse == pytest.approx(direct.total_sse, rel=1e-12)
    assert ruled.config["low_bits_init"] == low and ruled.config["loftq_iters"] == 1
    kept, _ = run(2.0, loftq_iters=1, low_bits_init=low)
    assert not kept.low_bits_init and (kept.loftq_iters, kept.init_codebooks) == (1, "fixed")
    uniform, _ = run(1, loftq_iters=1, plan="uniform", low_bits_init=low)  # no plan: the integer width
    assert uniform.low_bits_init and uniform.loftq_iters == 3
    stored, _ = run(2.9, loftq_iters=1, budget_kind="effective", low_bits_init=low)  # the plan's code bits
    assert stored.bits_nominal < 2.0 and stored.low_bits_init and stored.loftq_iters == 3
    nf, _ = run(1.5, loftq_iters=1, codebook="nf", low_bits_init=low)  # NormalFloat tables are never relearned
    assert nf.low_bits_init and (nf.loftq_iters, nf.init_codebooks) == (3, "fixed")


def test_init_codebooks_relearn_refits_the_requantized_rows():
    """relearn: from the second alternation each row's codebook is learned on W - sBA (the plan's widths
    kept); with one alternation it changes nothing."""
    reports, layers = {}, {}
    for mode, iters in (("fixed", 1), ("relearn", 1), ("fixed", 3), ("relearn", 3)):
        model = load_model()
        reports[mode, iters] = quantize_model(model, 1.5, rank=2, loftq_iters=iters, init_codebooks=mode, **FAST)
        layers[mode, iters] = {n: m for n, m in model.named_modules() if isinstance(m, LowRALinear)}
    one_fixed, one_relearn = layers["fixed", 1], layers["relearn", 1]
    for name, layer in one_fixed.items():  # a single alternation never re-quantizes: identical models
        assert torch.equal(layer.qweight.dequantize(torch.float32), one_relearn[name].qweight.dequantize(torch.float32))
    fixed, relearn = layers["fixed", 3], layers["relearn", 3]
    for name, layer in fixed.items():  # the plan's widths are kept either way
        assert torch.equal(layer.qweight.bits_per_row, relearn[name].qweight.bits_per_row)
    changed = [n for n in fixed if any(not torch.equal(a.codebook, b.codebook) for a, b in
                                       zip(fixed[n].qweight.groups, relearn[n].qweight.groups))]
    assert changed, "relearn kept every codebook"
    assert reports["relearn", 3].config["init_codebooks"] == "relearn"
    # the init keeps its best iterate, and the first is the same with or without relearning
    assert reports["relearn", 3].total_sse <= reports["relearn", 1].total_sse * (1 + 1e-6)
    uniform = {}  # without a plan (every row at the integer budget) too
    for mode in ("fixed", "relearn"):
        model = load_model()
        quantize_model(model, 2, rank=2, loftq_iters=3, plan="uniform", init_codebooks=mode, **FAST)
        uniform[mode] = {n: m.qweight.groups[0].codebook for n, m in model.named_modules()
                         if isinstance(m, LowRALinear)}
    assert any(not torch.equal(uniform["fixed"][n], uniform["relearn"][n]) for n in uniform["fixed"])
