"""lowra.checkpoint: version-1 folders are refused with how to convert them, merge_to_hf, PEFT export,
file modes. The HF-folder format itself (identical logits, the plan and trainability after a reload,
shards, atomic save, bad input) is tested in test_hf.py."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_testutils import logits

import lowra.checkpoint as ckpt
from experiments.eval.stories import load_model
from lowra.checkpoint import export_peft_adapters, load_quantized, merge_to_hf, save_quantized
from lowra.format import FormatError
from lowra.linear import LowRALinear
from lowra.model_quantization import quantize_model


def _version1_folder(path):
    """What ``save_quantized_legacy`` (removed) wrote: manifest.json and token-named data files."""
    path.mkdir()
    manifest = {"format": "lowra.model", "format_version": 1, "files": {"rest": "rest.0123456789ab.safetensors"}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "rest.0123456789ab.safetensors").write_bytes(b"")
    return path


def test_version1_folders_are_refused_naming_the_layout_and_the_conversion(tmp_path):
    old = _version1_folder(tmp_path / "old")
    assert ckpt.is_checkpoint(old)  # so the runner and the evaluator load it, and fail loudly here
    for verify in (True, False):
        with pytest.raises(FormatError, match=r"version-1 layout \(manifest\.json.*format_version 1.*"
                                              r"no longer reads.*commit \w+.*save_quantized\(lowra\.load_quantized"):
            load_quantized(old, verify=verify)
    (old / "manifest.json").write_text(json.dumps({"format": "something-else"}))  # a foreign manifest.json
    with pytest.raises(FormatError, match="not a LowRA checkpoint"):
        load_quantized(old)


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


def test_save_requires_quantized_model(tmp_path):
    with pytest.raises(ValueError, match="quantize_model"):
        save_quantized(load_model(), tmp_path / "x")


def test_saved_files_respect_the_umask(quantized, tmp_path):
    import os
    import stat

    model, _ = quantized
    old = os.umask(0o022)
    try:
        save_quantized(model, tmp_path / "ck")
        merge_to_hf(model, tmp_path / "merged")
        export_peft_adapters(model, tmp_path / "peft", include_base=True)
    finally:
        os.umask(old)
    for f in [*(tmp_path / "ck").rglob("*"), *(tmp_path / "merged").iterdir(), *(tmp_path / "peft").rglob("*")]:
        assert stat.S_IMODE(f.stat().st_mode) == (0o755 if f.is_dir() else 0o644), f
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o755
