"""LowRAConfig (lowra/config.py): validation naming the field, strict JSON round trip, the
keyword shortcut of quantize_model, and the config carried by reports and checkpoints."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch
from torch import nn

import lowra
from lowra.config import PAPER, PLAN_OPTIONS, LowRAConfig, config_from_arguments
from lowra.model_quantization import quantize_model

FAST_PLAN = {"clusters": 8, "samples": 0, "max_nodes": 200}


def test_exported_and_round_trips_through_json():
    assert lowra.LowRAConfig is LowRAConfig
    cfg = LowRAConfig(bits=1.5, candidates=[1, 2, 3, 4], target_modules=["q_proj", "v_proj"], rank=8, alpha=16,
                      plan_options={"clusters": 32, "solver_options": {"presolve": "off"}},
                      adapter_dtype=torch.bfloat16)
    assert cfg.candidates == (1, 2, 3, 4) and cfg.target_modules == ("q_proj", "v_proj")
    assert cfg.adapter_dtype == "bfloat16" and isinstance(cfg.alpha, float)
    d = cfg.to_dict()
    assert d["quant_method"] == "lowra" and d["candidates"] == [1, 2, 3, 4]
    back = LowRAConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg and back.to_dict() == d
    assert LowRAConfig.from_dict({"bits": 2}) == LowRAConfig(bits=2.0)
    regex = LowRAConfig(bits=2, target_modules=r".*\.q_proj")
    assert LowRAConfig.from_dict(regex.to_dict()).target_modules == r".*\.q_proj"


def test_from_dict_refuses_unknown_keys_and_other_methods():
    d = LowRAConfig(bits=2).to_dict()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lora_rank', 'zzz'\]"):
        LowRAConfig.from_dict({**d, "zzz": 1, "lora_rank": 4})
    with pytest.raises(ValueError, match="quant_method must be 'lowra'.*'bitsandbytes'"):
        LowRAConfig.from_dict({**d, "quant_method": "bitsandbytes"})
    with pytest.raises(ValueError, match="'bits' is required"):
        LowRAConfig.from_dict({"method": "nf"})
    with pytest.raises(ValueError, match="needs a mapping"):
        LowRAConfig.from_dict([("bits", 2)])


@pytest.mark.parametrize("field,value,match", [
    ("bits", 4.5, "bits: bit budget must lie in"),
    ("bits", float("nan"), "bits: bit budget"),
    ("bits", "two", "bits must be a number"),
    ("method", "bogus", "unknown quantization method 'bogus'"),
    ("group_size", 0, "group_size must be a positive integer"),
    ("group_size", 2.5, "group_size must be an integer"),
    ("candidates", (1, 5), "candidates must be distinct widths"),
    ("candidates", (2, 2), "candidates must be distinct widths"),
    ("codebook", "kmeans", "codebook must be 'learned' or 'nf'"),
    ("plan", "greedy", "plan must be 'ilp' or 'uniform'"),
    ("budget_scope", "layer", "budget_scope must be 'model' or 'matrix'"),
    ("budget_kind", "stored", "quant.budget_kind must be"),
    ("error", "l2", "quant.error must be one of"),
    ("init", "svd", "quant.init must be one of"),
    ("rank", -1, "rank must be a non-negative integer"),
    ("alpha", 0, "alpha must be positive"),
    ("dropout", 1.0, r"dropout must lie in \[0, 1\)"),
    ("loftq_iters", -1, "loftq_iters must be a non-negative integer"),
    ("double_quant", "yes", "double_quant must be true or false"),
    ("skip_modules", "lm_head", "skip_modules must be a list of module names"),
    ("adapter_dtype", "int8", "adapter_dtype must be one of"),
    ("plan_options", {"scope": "matrix"}, r"plan_options: unknown option\(s\) \['scope'\]"),
    ("quant_options", {"hessian": torch.eye(2)}, r"quant_options must hold JSON values.*\['hessian'\]"),
    ("calibration_batch_size", 0, "calibration_batch_size must be a positive integer"),
])
def test_bad_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        LowRAConfig(**{"bits": 2.0, field: value})


def test_cross_field_rules():
    with pytest.raises(ValueError, match="fractional budget needs method='lowra'"):
        LowRAConfig(bits=2.5, method="nf")
    with pytest.raises(ValueError, match=r"plan='uniform'.*fractional"):
        LowRAConfig(bits=1.5, plan="uniform")
    with pytest.raises(ValueError, match="error table of LowRA's planner"):
        LowRAConfig(bits=2, method="nf", error="fisher")
    with pytest.raises(ValueError, match="fisher_codebooks=True needs error='fisher'"):
        LowRAConfig(bits=2, fisher_codebooks=True)
    with pytest.raises(ValueError, match="init_codebooks must be 'fixed' or 'relearn'"):
        LowRAConfig(bits=2, init_codebooks="sometimes")
    with pytest.raises(ValueError, match="init_codebooks=relearn needs method='lowra' with learned codebooks"):
        LowRAConfig(bits=2, codebook="nf", init_codebooks="relearn")
    with pytest.raises(ValueError, match="budget_kind=effective needs method='lowra' with a precision plan"):
        LowRAConfig(bits=2, plan="uniform", budget_kind="effective")
    low = {"below": 2.0, "loftq_iters": 4, "init_codebooks": "relearn"}
    assert LowRAConfig(bits=1.5, low_bits_init=low).low_bits_init == low
    for bad, match in (({"below": 2.0}, "needs exactly the keys"),
                       ({**low, "below": 1.0}, r"below must lie in \(1, 4\]"),
                       ({**low, "loftq_iters": -1}, "loftq_iters must be >= 0"),
                       ({**low, "init_codebooks": "often"}, "init_codebooks must be 'fixed' or 'relearn'"),
                       (4, "must be null or a mapping")):
        with pytest.raises(ValueError, match=f"quant.low_bits_init.*{match}|{match}"):
            LowRAConfig(bits=1.5, low_bits_init=bad)
    with pytest.raises(ValueError, match="low_bits_init needs method='lowra'"):
        LowRAConfig(bits=2, method="nf", low_bits_init=low)
    assert LowRAConfig(bits=2, codebook="nf", low_bits_init=low).codebook == "nf"  # NF tables: kept fixed
    assert LowRAConfig(bits=6.5, budget_kind="effective").bits == 6.5  # stored bits: up to 16
    assert LowRAConfig(bits=16, method="none").method == "none"  # plain LoRA: the budget is ignored


def test_plan_options_are_exactly_the_free_options_of_assign_precision():
    from lowra.precision import assign_precision

    params = set(inspect.signature(assign_precision).parameters)
    given_by_quantize_model = {"errors", "params", "budget", "candidates", "scope", "layer_sizes", "layer_ids",
                               "bit_costs"}
    assert set(PLAN_OPTIONS) == params - given_by_quantize_model


def test_keyword_shortcut_builds_the_same_config():
    cfg, runtime = config_from_arguments(2.0, {"method": "optq", "rank": 4, "damp": 0.02, "hessian": torch.eye(3)})
    assert cfg == LowRAConfig(bits=2.0, method="optq", rank=4, quant_options={"damp": 0.02})
    assert set(runtime) == {"hessian"}  # data of the call: used, never stored
    assert config_from_arguments(None, {"bits": 3, "use_plan": False})[0].plan == "uniform"
    base = LowRAConfig(bits=2, rank=8)
    over, _ = config_from_arguments(base, {"rank": 2, "alpha": 4})
    assert (over.rank, over.alpha, over.bits, base.rank) == (2, 4.0, 2.0, 8)
    assert config_from_arguments(base.to_dict(), {})[0] == base
    with pytest.raises(ValueError, match="budget twice"):
        config_from_arguments(2.0, {"bits": 3})
    assert config_from_arguments(None, {"rank": 4})[0] == LowRAConfig(rank=4)  # over the runner's default
    with pytest.raises(ValueError, match="rank must be a non-negative integer"):
        config_from_arguments(base, {"rank": -2})


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 64))


def test_quantize_model_with_a_config_equals_the_keywords():
    config = LowRAConfig(bits=1.5, rank=2, alpha=4, group_size=16, codebook_iters=5, plan_options=FAST_PLAN, **PAPER)
    by_config, by_kw = _toy(), _toy()
    rep = quantize_model(by_config, config, progress=False)
    rep_kw = quantize_model(by_kw, 1.5, rank=2, alpha=4, group_size=16, codebook_iters=5, plan_options=FAST_PLAN,
                            **PAPER,
                            progress=False)
    assert rep.config == rep_kw.config == config.to_dict()
    assert by_config.lowra_config == config and rep.to_dict()["config"] == config.to_dict()
    a, b = by_config.state_dict(), by_kw.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert dataclasses.replace(config, rank=3) != config


def test_checkpoint_carries_the_config(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowra.checkpoint import load_quantized, save_quantized

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    config = LowRAConfig(bits=2, method="nf", rank=2, alpha=4, group_size=16)
    quantize_model(model, config, progress=False)
    save_quantized(model, tmp_path / "hf")  # config.json's quantization_config and lowra_report.json
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    report = json.loads((tmp_path / "hf" / "lowra_report.json").read_text())
    assert saved["lowra_config"] == config.to_dict() == report["config"]
    assert load_quantized(tmp_path / "hf").lowra_config == config


# ---- the method's own options, nested (issue 28): LowRAConfig = common fields + method_config
#: ``LowRAConfig(bits=4, method="nf").to_dict()`` as checkpoints stored it before the options were nested
OLD_NF_DICT = {
    "quant_method": "lowra", "bits": 4.0, "method": "nf", "group_size": 64, "double_quant": True,
    "candidates": [1, 2, 4], "codebook": "learned", "codebook_iters": 20, "weight_power": 2.0, "plan": "ilp",
    "budget_scope": "model", "budget_kind": "nominal", "error": "sse", "fisher_codebooks": False,
    "measure_windows": 16, "calibration_batch_size": 4, "plan_options": {}, "quant_options": {}, "rank": 16,
    "alpha": 16.0, "dropout": 0.0, "loftq_iters": 0, "init": "loftq", "init_damp": 0.01, "init_codebooks": "fixed",
    "low_bits_init": None, "target_modules": None, "skip_modules": ["lm_head"], "adapter_dtype": None,
}
#: the same for LowRA's paper preset at 1.5 bits with some of its options changed
OLD_LOWRA_DICT = {
    **OLD_NF_DICT, "bits": 1.5, "method": "lowra", "double_quant": False, "codebook": "nf", "codebook_iters": 5,
    "budget_scope": "matrix", "loftq_iters": 1, "measure_windows": 4,
}


def test_method_options_are_nested_and_flat_keywords_still_build_them():
    from lowra.methods import LowRAOptions, MethodOptions

    flat = LowRAConfig(bits=2, codebook="nf", codebook_iters=5)
    assert isinstance(flat.method_config, LowRAOptions) and flat.method_config.codebook == "nf"
    assert flat == LowRAConfig(bits=2, method_config=LowRAOptions(codebook="nf", codebook_iters=5))
    assert flat == LowRAConfig(bits=2, method_config={"codebook": "nf", "codebook_iters": 5})
    assert (flat.codebook, flat.codebook_iters, flat.error) == ("nf", 5, "kfac")  # read through the options
    assert dataclasses.replace(flat, codebook="learned").method_config == LowRAOptions(codebook_iters=5)
    nf = LowRAConfig(bits=4, method="nf")
    assert type(nf.method_config) is MethodOptions and (nf.codebook, nf.error, nf.low_bits_init) == \
        ("learned", "sse", None)  # what such configs always read
    with pytest.raises(ValueError, match="codebook must be 'learned' or 'nf'"):
        LowRAOptions(codebook="kmeans")  # validated in __post_init__


def test_an_option_of_another_method_names_the_field_and_the_method():
    from lowra.methods import LowRAOptions

    with pytest.raises(ValueError, match="codebook is a LowRA option; method='nf' does not take it"):
        LowRAConfig(bits=4, method="nf", codebook="nf")
    with pytest.raises(ValueError, match="plan is a LowRA option; method='none' does not take it"):
        LowRAConfig(bits=16, method="none", method_config=LowRAOptions(plan="uniform"))
    with pytest.raises(ValueError, match="zzz is not an option; method='lowra' does not take it"):
        LowRAConfig(bits=2, method_config={"zzz": 1})
    with pytest.raises(ValueError, match="method_config must be a LowRAOptions or a mapping"):
        LowRAConfig(bits=2, method_config=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'zzz'"):
        LowRAConfig(bits=2, zzz=1)


def test_old_flat_checkpoint_dicts_load_to_the_same_config_and_dict():
    nf = LowRAConfig.from_dict(OLD_NF_DICT)
    assert nf == LowRAConfig(bits=4, method="nf", double_quant=True, loftq_iters=0) and nf.to_dict() == OLD_NF_DICT
    lowra_cfg = LowRAConfig.from_dict(OLD_LOWRA_DICT)
    assert lowra_cfg == LowRAConfig(bits=1.5, codebook="nf", codebook_iters=5, budget_scope="matrix",
                                    measure_windows=4, error="sse", low_bits_init=None, candidates=(1, 2, 4),
                                    init="loftq")
    assert lowra_cfg.to_dict() == OLD_LOWRA_DICT
    assert list(lowra_cfg.to_dict()) == list(OLD_LOWRA_DICT)  # the same keys in the same order
    nested = {k: v for k, v in OLD_LOWRA_DICT.items() if k not in lowra_cfg.method_config.option_names()}
    assert LowRAConfig.from_dict({**nested, "method_config": lowra_cfg.method_config.to_dict()}) == lowra_cfg
    # every method's config carried codebook_iters / budget_scope / measure_windows: another method never read them
    assert LowRAConfig.from_dict({**OLD_NF_DICT, "codebook_iters": 7, "measure_windows": 2}) == nf
    assert LowRAConfig(bits=4, method="nf", double_quant=True, loftq_iters=0, codebook_iters=5) == nf  # ignored
