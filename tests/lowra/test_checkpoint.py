"""The legacy manifest layout (save_quantized_legacy / load_quantized: bit-identical, atomic, clear errors),
merge_to_hf, PEFT export. The HF-folder format of save_quantized is tested in test_hf.py."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_testutils import X, logits, perturb_adapters, tiny_mistral_config

import lowra.checkpoint as ckpt
import lowra.checkpoint.save as ckpt_save
from experiments.eval.stories import load_model
from lowra.checkpoint import export_peft_adapters, load_quantized, merge_to_hf, save_quantized, save_quantized_legacy
from lowra.config import PAPER
from lowra.format import FormatError
from lowra.linear import LowRALinear
from lowra.model_layers import lowra_layers
from lowra.model_quantization import quantize_model


def test_save_load_bit_identical(quantized, tmp_path):
    model, report = quantized
    save_quantized_legacy(model, tmp_path / "ck", source_model="stories260K")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["format"] == "lowra.model" and manifest["format_version"] == 1
    assert manifest["method"] == "lowra" and manifest["bits"] == 1.5 and manifest["source_model"] == "stories260K"
    assert manifest["layers"]["model.layers.0.mlp.down_proj"]["shape"] == [64, 172]
    assert manifest["report"]["bits_nominal"] == pytest.approx(report.bits_nominal)
    loaded = load_quantized(tmp_path / "ck")
    assert torch.equal(logits(loaded), logits(model))
    for (n, a), (m, b) in zip(lowra_layers(model), lowra_layers(loaded)):
        assert n == m and torch.equal(a.qweight.bits_per_row, b.qweight.bits_per_row)
        assert b.qweight.scales.double_quant
    # only the adapters train after loading, and the reloaded model still trains
    assert {n.rsplit(".", 1)[-1] for n, p in loaded.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    loaded.train()
    loaded(X, labels=X).loss.backward()
    # loading into an existing (unquantized) model of the same architecture works too
    into = load_quantized(tmp_path / "ck", model=load_model())
    assert torch.equal(logits(into), logits(model))


def test_resave_replaces_old_files(quantized, tmp_path):
    model, _ = quantized
    save_quantized_legacy(model, tmp_path / "ck")
    first = set(p.name for p in (tmp_path / "ck").iterdir())
    save_quantized_legacy(model, tmp_path / "ck")
    second = set(p.name for p in (tmp_path / "ck").iterdir())
    assert len(first) == len(second) == 5 and first != second and "manifest.json" in second


def test_crash_mid_save_keeps_previous_save(quantized, tmp_path, monkeypatch):
    model, _ = quantized
    save_quantized_legacy(model, tmp_path / "ck")
    before = logits(model)
    names = set(p.name for p in (tmp_path / "ck").iterdir())
    changed = load_model()
    quantize_model(changed, 4, method="nf", rank=2, progress=False)
    calls = {"n": 0}
    real = ckpt_save.save_safetensors_atomic

    def crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_save, "save_safetensors_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        save_quantized_legacy(changed, tmp_path / "ck")
    monkeypatch.undo()
    assert set(p.name for p in (tmp_path / "ck").iterdir()) == names  # partial files removed
    assert torch.equal(logits(load_quantized(tmp_path / "ck")), before)


def test_merge_reloads_with_transformers(quantized, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = quantized
    merge_to_hf(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert isinstance(merged.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    torch.testing.assert_close(logits(merged), logits(model), rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, LowRALinear) for m in model.modules())  # the quantized model is untouched


def test_merge_of_a_loaded_checkpoint_reloads(quantized, tmp_path):
    """Issue 32: a model loaded from a LowRA folder carries its quantization_config; the merged folder
    must not (it held plain weights but said quant_method=lowra, and from_pretrained refused it)."""
    from transformers import AutoModelForCausalLM

    model, report = quantized
    save_quantized(model, tmp_path / "ck", report=report)
    loaded = load_quantized(tmp_path / "ck")
    assert getattr(loaded.config, "quantization_config", None) is not None
    for include_adapters, name in ((True, "merged"), (False, "base")):
        merge_to_hf(loaded, tmp_path / name, include_adapters=include_adapters)
        assert "quantization_config" not in json.loads((tmp_path / name / "config.json").read_text())
        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / name))
        assert isinstance(plain.model.layers[0].mlp.down_proj, torch.nn.Linear)
        if include_adapters:
            torch.testing.assert_close(logits(plain), logits(model), rtol=1e-4, atol=1e-4)
    assert getattr(loaded.config, "quantization_config", None) is not None  # the loaded model is untouched


def test_peft_export_on_dequantized_base(quantized, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _ = quantized
    with pytest.raises(ValueError, match="base_model_name_or_path: the dequantized base"):
        export_peft_adapters(model, tmp_path / "adapter")  # the source model would silently be wrong
    with pytest.warns(UserWarning, match="cannot check that 'stories260K' is the dequantized base"):
        export_peft_adapters(model, tmp_path / "adapter", base_model_name_or_path="stories260K")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 16
    assert "down_proj" in config["target_modules"]
    merge_to_hf(model, tmp_path / "base", include_adapters=False)
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=1e-4, atol=1e-4)


def test_peft_own_loading_of_the_export_gives_the_lowra_logits(quantized, tmp_path):
    """Issue 32, item 3: PEFT's convention — load the base adapter_config.json names, apply the adapters —
    gives the LowRA model's logits (1e-4) with include_base=True, from an in-memory model and from a
    loaded checkpoint; lowra.load_peft does the same with the checksums checked."""
    import warnings

    from peft import AutoPeftModelForCausalLM

    from lowra.checkpoint import load_peft

    model, report = quantized
    save_quantized(model, tmp_path / "ck", report=report)
    for source, name in ((model, "peft"), (load_quantized(tmp_path / "ck"), "peft-loaded")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the right base: no warning
            export_peft_adapters(source, tmp_path / name, include_base=True)
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str((tmp_path / name / "base").resolve())
        peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / name)).eval()
        diff = (logits(peft_model) - logits(model)).abs().max().item()
        assert diff <= 1e-4, diff
        torch.testing.assert_close(logits(load_peft(tmp_path / name)), logits(model), rtol=1e-4, atol=1e-4)


def test_export_checks_a_named_base(quantized, tmp_path):
    """A dequantized base of this model is accepted silently, one of another model is refused, anything
    else is written with a loud warning; include_base and a name together are refused."""
    import warnings

    model, _ = quantized
    merge_to_hf(model, tmp_path / "base", include_adapters=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_peft_adapters(model, tmp_path / "a", base_model_name_or_path=str(tmp_path / "base"))
    other = load_model()
    quantize_model(other, 2.0, rank=2, alpha=16, plan="uniform", loftq_iters=0, codebook_iters=1, progress=False)
    merge_to_hf(other, tmp_path / "other-base", include_adapters=False)
    with pytest.raises(ValueError, match="dequantized base of another quantized model"):
        export_peft_adapters(model, tmp_path / "b", base_model_name_or_path=str(tmp_path / "other-base"))
    merge_to_hf(model, tmp_path / "merged")  # merged with the adapters: not the base they fit
    with pytest.warns(UserWarning, match="gives wrong logits"):
        export_peft_adapters(model, tmp_path / "c", base_model_name_or_path=str(tmp_path / "merged"))
    with pytest.raises(ValueError, match="not both"):
        export_peft_adapters(model, tmp_path / "d", base_model_name_or_path="x", include_base=True)
    assert not (tmp_path / "b").exists() and not (tmp_path / "d").exists()


def test_method_none_and_mistral_roundtrip(tmp_path):
    from transformers import MistralForCausalLM

    config, x = tiny_mistral_config()
    for method, bits in [("none", 16), ("lowra", 2.5)]:
        model = MistralForCausalLM(config).eval()
        quantize_model(model, bits, method=method, rank=4, alpha=8, codebook_iters=3, **PAPER,
                       plan_options={"clusters": 8, "samples": 0, "max_nodes": 200}, progress=False)
        perturb_adapters(model)
        save_quantized_legacy(model, tmp_path / method)
        assert torch.equal(logits(load_quantized(tmp_path / method), x), logits(model, x))


# ---------------------------------------------------------------------------------- bad input
def test_foreign_truncated_and_wrong_shape(quantized, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, _ = quantized
    with pytest.raises(FormatError, match="not a LowRA checkpoint"):
        load_quantized(tmp_path)  # an empty (foreign) directory
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(FormatError, match="not a LowRA checkpoint"):
        load_quantized(tmp_path)

    save_quantized_legacy(model, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    other = load_model().config.to_dict()
    other.update(hidden_size=32, intermediate_size=86, head_dim=4)
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj' has shape"):
        load_quantized(tmp_path / "ck", model=LlamaForCausalLM(LlamaConfig(**other)))

    bumped = dict(manifest, format_version=99)
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(bumped))
    with pytest.raises(FormatError, match="version 99"):
        load_quantized(tmp_path / "ck")
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(manifest))

    path = tmp_path / "ck" / manifest["files"]["quantized"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated"):
        load_quantized(tmp_path / "ck")
    # same size but garbage inside: safetensors refuses it, with the file named
    path.write_bytes(b"\0" * len(data))
    with pytest.raises(FormatError, match="quantized"):
        load_quantized(tmp_path / "ck")


def test_save_requires_quantized_model(tmp_path):
    for save in (save_quantized, save_quantized_legacy):
        with pytest.raises(ValueError, match="quantize_model"):
            save(load_model(), tmp_path / "x")


# ---------------------------------------------------------------------------------- integrity
def _kind(name: str) -> str:
    """``model.layers.0.self_attn.q_proj/b2.codes`` → ``b2.codes``; ``….lora_A`` → ``lora_A``."""
    return name.rsplit("/", 1)[-1] if "/" in name else name.rsplit(".", 1)[-1]


def test_bytes_changed_at_the_same_size_are_refused_in_every_tensor_kind(quantized, tmp_path):
    """8 bytes flipped in one tensor of each kind (codes, rows, codebooks, double-quantized absmax
    parts, plan, adapters, embeddings, norms) — and in the config — fail the sha256 check."""
    from corrupt_testutils import flip_bytes, tensor_names

    model, _ = quantized
    save_quantized_legacy(model, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert set(manifest["file_sha256"]) == set(manifest["files"])
    seen = set()
    for kind in ("quantized", "adapters", "rest"):
        path = tmp_path / "ck" / manifest["files"][kind]
        good = path.read_bytes()
        for name in tensor_names(path):
            if _kind(name) in seen:
                continue
            seen.add(_kind(name))
            flip_bytes(path, name)
            assert path.stat().st_size == len(good)
            with pytest.raises(FormatError, match="sha256"):
                load_quantized(tmp_path / "ck")
            path.write_bytes(good)
    assert {"b1.codes", "b1.rows", "b1.codebook", "b2.codes", "absmax.codes", "absmax.scale", "absmax.offset",
            "plan.bits", "lora_A", "lora_B", "weight"} <= seen
    config = tmp_path / "ck" / manifest["files"]["config"]
    text = config.read_text()
    config.write_text(text.replace('"hidden_size": 64', '"hidden_size": 46'))
    with pytest.raises(FormatError, match="sha256"):
        load_quantized(tmp_path / "ck")
    config.write_text(text)
    assert torch.equal(logits(load_quantized(tmp_path / "ck")), logits(model))


def test_verify_false_skips_hashing_but_not_the_finite_check(quantized, tmp_path):
    from corrupt_testutils import flip_bytes, tensor_names

    model, _ = quantized
    save_quantized_legacy(model, tmp_path / "ck")
    manifest = ckpt.read_manifest(tmp_path / "ck", verify=False)
    path = tmp_path / "ck" / manifest["files"]["quantized"]
    good = path.read_bytes()
    codes = next(n for n in tensor_names(path) if n.endswith("/b2.codes"))
    flip_bytes(path, codes)  # finite garbage: only the checksum sees it
    assert not torch.equal(logits(load_quantized(tmp_path / "ck", verify=False)), logits(model))
    for suffix, match in [("/b1.codebook", "codebook"), ("/absmax.scale", "absmax.scale")]:
        path.write_bytes(good)
        name = next(n for n in tensor_names(path) if n.endswith(suffix))
        flip_bytes(path, name, count=4, fill=0xFF)  # NaN in fp16 and fp32
        with pytest.raises(FormatError, match=match):
            load_quantized(tmp_path / "ck", verify=False)


def test_saved_files_respect_the_umask(quantized, tmp_path):
    import os
    import stat

    model, _ = quantized
    old = os.umask(0o022)
    try:
        save_quantized_legacy(model, tmp_path / "ck")
        merge_to_hf(model, tmp_path / "merged")
        export_peft_adapters(model, tmp_path / "peft", include_base=True)
    finally:
        os.umask(old)
    for f in [*(tmp_path / "ck").iterdir(), *(tmp_path / "merged").iterdir(), *(tmp_path / "peft").rglob("*")]:
        assert stat.S_IMODE(f.stat().st_mode) == (0o755 if f.is_dir() else 0o644), f
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o755
