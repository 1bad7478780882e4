"""The runner-facing methods (``lowra.methods``): budgets, their Hydra options, and each method run
end to end on the real stories260K — quantize per the spec, then a few adapter training steps
through the shared ``LowRALinear`` (the loss on the trained batch must drop)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lowra.config import PAPER
from lowra.methods import METHODS, get_method, method_of, optimizer_for
from lowra.quantizers import QUANTIZERS

REPO = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("LOWRA_ASSETS", REPO.parent / "shared" / "assets"))
MODEL_DIR = ASSETS / "models" / "stories260K"
TEXT = ASSETS / "corpora" / "tinystories_valid.txt"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- budgets
def _preset(name: str, bits) -> object:
    q = OmegaConf.load(REPO / "conf" / "quant" / f"{name}.yaml")
    q.bits = bits
    return q


@pytest.mark.parametrize(("method", "ok", "bad"), [
    ("qlora", [4, 4.0], [2, 3, 1.5, 8]),
    ("loftq", [2, 4], [1, 3, 2.5]),
    ("modulora", [2, 3, 4], [1, 1.5, 5]),
    ("lowra", [1, 1.15, 2.25, 4], [0.9, 4.5, float("nan")]),
])
def test_budgets_accepted_and_refused(method: str, ok: list, bad: list) -> None:
    """The runner's budget check of a preset (its yaml: budget_choices / budget_min..max) and the
    method's own check (``Method.check_bits`` through ``LowRAConfig``) agree."""
    from experiments.runner.config_check import BudgetError, check_bits
    from lowra.config import LowRAConfig

    spec = get_method(method)
    for b in ok:
        assert check_bits(_preset(method, b)) == float(b)
        assert LowRAConfig(bits=b, method=spec.quantizer, error="sse", init="loftq").bits == float(b)
    for b in bad:
        with pytest.raises(BudgetError, match=f"quant={method}"):
            check_bits(_preset(method, b))


def test_lora_ignores_the_budget_and_unknown_methods_are_named() -> None:
    from lowra.config import LowRAConfig

    assert LowRAConfig(bits=16, method="none").bits == 16.0  # the dense base ignores the budget
    assert "16" in get_method("lora").accepted()
    with pytest.raises(ValueError, match="unknown method 'gptq'.*modulora"):
        get_method("gptq")
    with pytest.raises(ValueError, match="unknown quantization method 'gptq'"):
        method_of("gptq")
    with pytest.raises(ValueError, match="bits must be a number"):
        LowRAConfig(bits="four", method="nf")


def test_methods_answer_what_the_stages_ask() -> None:
    """Each method object says whether it plans, what calibration it needs, its quantizer's budgets."""
    from lowra.config import LowRAConfig

    default = LowRAConfig(bits=2.0, error="kfac", init="calibrated")
    needs = default.method_object.needs(default)
    assert default.method_object.plans(default) and needs.hessians and needs.output_grads and needs.init
    assert not needs.fisher and needs.gradients and needs.why == "quant.error=kfac"
    paper = LowRAConfig(bits=2.0, error="sse", init="loftq")
    assert not paper.method_object.needs(paper).any
    optq = LowRAConfig(bits=3.0, method="optq")
    assert not optq.method_object.plans(optq) and optq.method_object.needs(optq).layer_hessians
    assert not method_of("none").quantizes and method_of("nf").quantizes
    with pytest.raises(ValueError, match="supports"):
        LowRAConfig(bits=1.0, method="optq")  # OPTQ's accepted_bits are (2, 3, 4)
    uniform = LowRAConfig(bits=3.0, plan="uniform", candidates=(1, 2))
    assert uniform.method_object.candidates(uniform) == (1, 2, 3)  # the integer budget joins them


def test_optimizer_hint() -> None:
    assert optimizer_for("qlora", "cuda", bnb_available=True) == "paged_adamw_8bit"
    assert optimizer_for("qlora", "cuda:0", bnb_available=False) == "adamw"
    assert optimizer_for("qlora", "cpu") == "adamw"
    assert all(optimizer_for(m, "cuda", bnb_available=True) == "adamw" for m in METHODS if m != "qlora")


def q_init(name: str) -> str:
    return OmegaConf.load(REPO / "conf" / "quant" / f"{name}.yaml")["init"]


def test_specs_match_the_quantizers_and_the_hydra_options() -> None:
    """Each conf/quant/<method>.yaml mirrors lowra.yaml's keys and agrees with its MethodSpec."""
    keys = list(OmegaConf.load(REPO / "conf" / "quant" / "lowra.yaml").keys())
    for name, spec in METHODS.items():
        assert spec.quantizer == "none" or spec.quantizer in QUANTIZERS, name
        path = REPO / "conf" / "quant" / f"{name}.yaml"
        q = OmegaConf.to_container(OmegaConf.create({"quant": OmegaConf.load(path)}), resolve=True)["quant"]
        assert list(q) == keys, f"{path.name} keys differ from lowra.yaml"
        assert q["name"] == name and q["method"] == spec.quantizer
        assert q["double_quant"] == spec.double_quant and q["loftq_iters"] == spec.loftq_iters
        assert q["group_size"] == spec.group_size
        if spec.budget_choices is not None:
            assert [int(b) for b in q["budget_choices"]] == list(spec.budget_choices)
            assert float(q["bits"]) in [float(b) for b in q["budget_choices"]]  # the default budget is accepted
        elif spec.budget_range is not None:
            assert (q["budget_min"], q["budget_max"]) == spec.budget_range and not q["budget_choices"]
    assert get_method("qlora").double_quant and get_method("modulora").needs_calibration
    assert {m.init for m in METHODS.values()} == {"standard", "loftq", "calibrated"}
    assert q_init("lowra") == "calibrated" and q_init("lowra_paper") == "loftq"


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def assets() -> dict:
    if not MODEL_DIR.is_dir() or not TEXT.is_file():
        pytest.fail(f"real assets missing under {ASSETS} (set LOWRA_ASSETS)")
    from transformers import AutoTokenizer

    from lowra.calibration import calibration_windows

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    stories = [s for s in TEXT.read_text(encoding="utf-8").split("\n\n") if s.strip()][:600]
    stream = torch.tensor([t for s in stories for t in [1, *tok(s, add_special_tokens=False)["input_ids"]]])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    return {"train": calibration_windows(stream, n_samples=2, seq_len=64, seed=0),
            "calib": calibration_windows(stream, n_samples=96, seq_len=64, seed=1),
            "model": model}


def _quantize(model, name: str, bits, rank: int, alpha: float, calib: torch.Tensor) -> None:
    """Quantize ``model`` in place the way the runner does for ``quant=name``."""
    from lowra.model_quantization import quantize_model

    spec = get_method(name)
    bits = None if spec.ignores_budget else bits
    common = dict(rank=rank, alpha=alpha, target_modules=TARGETS, group_size=spec.group_size,
                  double_quant=spec.double_quant, loftq_iters=spec.loftq_iters, progress=False)
    if not spec.needs_calibration:
        preset = PAPER if spec.quantizer == "lowra" else {}  # lowra_paper: the data-free paper preset
        quantize_model(model, 16 if bits is None else bits, method=spec.quantizer, **preset, **common)
        return
    if spec.quantizer == "lowra":  # the measured default: K-FAC table and calibrated init from calib text
        quantize_model(model, bits, method="lowra", error="kfac", init="calibrated", candidates=(1, 2, 3, 4),
                       calibration=calib, calibration_batch_size=16, **common)
        return
    # modulora: one Hessian per layer from the full-precision model, then OPTQ behind LowRALinear
    # (quantize_model passes one set of quantizer options to every layer, so swap the bases here).
    from lowra.calibration import collect_hessians
    from lowra.linear import LowRALinear
    from lowra.model_layers import lowra_layers, mark_only_lora_trainable
    from lowra.quantizers import quantize

    hessians = collect_hessians(model, calib.split(48), TARGETS)
    quantize_model(model, bits, method="none", **common)
    for layer_name, layer in lowra_layers(model):
        qt = quantize(layer.dense_weight, bits, method="optq", group_size=spec.group_size,
                      hessian=hessians[layer_name])
        new = LowRALinear(qt, bias=layer.bias, rank=rank, alpha=alpha,
                          lora_A=layer.lora_A.detach(), lora_B=layer.lora_B.detach())
        parent, _, child = layer_name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    mark_only_lora_trainable(model)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "bits", "want_bits"), [
    ("lora", None, None), ("qlora", 4, 4.0), ("loftq", 2, 2.0), ("modulora", 3, 3.0), ("lowra", 1.5, 1.5),
    ("lowra_paper", 1.5, 1.5),
])
def test_method_end_to_end_on_stories260k(assets: dict, name: str, bits, want_bits) -> None:
    from lowra.model_layers import lora_parameters, lowra_layers

    torch.manual_seed(0)
    model = copy.deepcopy(assets["model"])
    _quantize(model, name, bits, rank=2, alpha=4.0, calib=assets["calib"])
    spec = get_method(name)
    layers = lowra_layers(model)
    assert len(layers) == 35
    quantized = [m.is_quantized for _, m in layers]
    assert all(quantized) if spec.quantizer != "none" else not any(quantized)
    if want_bits is not None:
        n = sum(m.in_features * m.out_features for _, m in layers)
        nominal = sum(m.nominal_bits * m.in_features * m.out_features for _, m in layers) / n
        assert abs(nominal - want_bits) < 0.02, nominal
        methods = {m.qweight.method for _, m in layers}
        assert methods == {spec.quantizer}
        if spec.double_quant:
            assert all(m.qweight.scales.double_quant for _, m in layers)
    b_zero = all(float(m.lora_B.detach().abs().max()) == 0.0 for _, m in layers)
    assert b_zero == (spec.init == "standard")
    if spec.quantizer == "lowra":
        assert model.lowra_report.init == spec.init

    params = lora_parameters(model)
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = assets["train"]
    model.train()
    with torch.no_grad():
        before = float(model(batch, labels=batch).loss)
    for _ in range(3):
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(model(batch, labels=batch).loss)
    print(f"\n{name} (bits={bits}): loss {before:.3f} → {after:.3f} after 3 steps ({optimizer_for(name)})")
    assert torch.isfinite(torch.tensor([before, after])).all()
    assert after < before
