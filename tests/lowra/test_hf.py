"""HF-native checkpoints: save_quantized folders load with AutoModelForCausalLM.from_pretrained
(identical logits), save_pretrained round-trips, shards, PEFT copy, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_testutils import X, logits, perturb_adapters, tiny_mistral_config
from safetensors.torch import load_file, save_file

import lowra.checkpoint as ckpt
import lowra.checkpoint.save as ckpt_save
from experiments.eval.stories import load_model, model_dir
from lowra.checkpoint import load_quantized, merge_to_hf, save_quantized
from lowra.config import PAPER
from lowra.format import FormatError
from lowra.hf import HF_FORMAT_VERSION, LowRAHfConfig, verification
from lowra.linear import LowRALinear
from lowra.model_layers import lora_parameters, lowra_layers
from lowra.model_quantization import quantize_model

LAYER = "model.layers.0.mlp.down_proj"


def _from_pretrained(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path))


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    model, report = quantized
    path = tmp_path_factory.mktemp("hf") / "ck"
    save_quantized(model, path, report=report)
    return path


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------- format + round trips
def test_folder_is_a_standard_hf_model_folder(quantized, saved):
    model, report = quantized
    names = {p.name for p in saved.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "lowra_report.json", "adapter", "lowra_checksums.json"} == names
    assert "adapter_config.json" not in names  # at the root it would make from_pretrained apply PEFT
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    q = config["quantization_config"]
    assert q["quant_method"] == "lowra" and q["format_version"] == HF_FORMAT_VERSION
    assert (q["method"], q["bits"], q["rank"], q["alpha"], q["group_size"], q["double_quant"]) == (
        "lowra", 1.5, 2, 16.0, 64, True)
    assert q["loftq_iters"] == 1 and q["candidates"] == [1, 2, 4] and "down_proj" in q["target_modules"]
    assert q["source_model"] == str(model_dir())
    assert set(q["layout"]) == {n for n, _ in lowra_layers(model)}
    spec = q["layout"][LAYER]
    assert spec["shape"] == [64, 172] and spec["rank"] == 2 and spec["quantized"]["double_quant"]
    stored = load_file(str(saved / "model.safetensors"))
    m = dict(lowra_layers(model))[LAYER]
    for key, t in m.qweight.state_dict().items():  # the codes are stored bit for bit
        suffix = key.replace(".", "_")
        assert torch.equal(stored[f"{LAYER}.{suffix}"], t)
        assert spec["tensors"][suffix]["dtype"] in ("I32", "F16", "F32", "I8")
    assert torch.equal(stored[f"{LAYER}.lora_B"], m.lora_B)
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored  # tied: stored once
    assert json.loads((saved / "lowra_report.json").read_text())["bits_nominal"] == pytest.approx(report.bits_nominal)


def test_from_pretrained_gives_identicallogits(quantized, saved):
    model, _ = quantized
    loaded = _from_pretrained(saved)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, LowRALinear)
    assert isinstance(loaded.config.quantization_config, LowRAHfConfig) and loaded.is_quantized
    assert torch.equal(logits(loaded), logits(model))
    # the LowRAConfig it was quantized with travels in quantization_config and comes back
    assert loaded.config.quantization_config.options["lowra_config"] == model.lowra_config.to_dict()
    assert loaded.lowra_config == model.lowra_config
    for (n, a), (m, b) in zip(lowra_layers(model), lowra_layers(loaded)):
        assert n == m and torch.equal(a.qweight.bits_per_row, b.qweight.bits_per_row)
        assert b.qweight.scales.double_quant and (a.rank, a.alpha) == (b.rank, b.alpha)
    # only the adapters train, and the loaded model trains
    assert {n.rsplit(".", 1)[-1] for n, p in loaded.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    loaded.train()
    loaded(X, labels=X).loss.backward()
    assert all(p.grad is not None for p in lora_parameters(loaded))
    # lowra.load_quantized reads the same folder
    assert torch.equal(logits(load_quantized(saved)), logits(model))


def test_save_pretrained_round_trips_with_new_adapters(quantized, saved, tmp_path):
    model, _ = quantized
    loaded = _from_pretrained(saved)
    loaded.save_pretrained(str(tmp_path / "again"))
    again = _from_pretrained(tmp_path / "again")
    assert torch.equal(logits(again), logits(model))
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"] == \
        json.loads((saved / "config.json").read_text())["quantization_config"]
    # adapters changed after loading (training) are what the next save holds; layout digests follow
    perturb_adapters(loaded, seed=1)
    expected = logits(loaded)
    loaded.save_pretrained(str(tmp_path / "trained"))
    assert torch.equal(logits(_from_pretrained(tmp_path / "trained")), expected)
    assert not torch.equal(expected, logits(model))
    # and save_quantized of a loaded model keeps the options of its quantization_config
    save_quantized(loaded, tmp_path / "resaved")
    q = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert (q["bits"], q["loftq_iters"], q["method"]) == (1.5, 1, "lowra")
    assert torch.equal(logits(load_quantized(tmp_path / "resaved")), expected)


def test_sharded_save_writes_an_index(quantized, tmp_path):
    model, _ = quantized
    save_quantized(model, tmp_path / "ck", max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "ck").glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / "ck" / "model.safetensors").exists()
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert f"{LAYER}.b1_codes" in index["weight_map"] and index["metadata"]["total_size"] > 0
    assert torch.equal(logits(_from_pretrained(tmp_path / "ck")), logits(model))


def test_peft_copy_applies_on_the_dequantized_base(quantized, saved, tmp_path):
    from peft import PeftModel

    model, _ = quantized
    config = json.loads((saved / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 16
    keys = load_file(str(saved / "adapter" / "adapter_model.safetensors"))
    assert f"base_model.model.{LAYER}.lora_A.weight" in keys and f"base_model.model.{LAYER}.lora_B.weight" in keys
    merge_to_hf(model, tmp_path / "base", include_adapters=False)
    peft_model = PeftModel.from_pretrained(_from_pretrained(tmp_path / "base"), str(saved / "adapter")).eval()
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=1e-4, atol=1e-4)


def test_peft_convention_never_pairs_the_adapters_with_the_source_model(saved):
    """Issue 32: adapter_config.json named the fp32 source, on which the adapters give wrong logits; it
    names the LowRA folder now, which PEFT's own loading refuses loudly (LowRALinear is no nn.Linear)."""
    from peft import AutoPeftModelForCausalLM

    config = json.loads((saved / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == saved.resolve()
    assert "dequantized" in (saved / "adapter" / "README.md").read_text()
    with pytest.raises(ValueError, match="not supported"):
        AutoPeftModelForCausalLM.from_pretrained(str(saved / "adapter"))


def test_dense_base_bf16_and_untied_mistral(tmp_path):
    """A dense (method="none") base, and a bf16 model: the rest of the model comes back in bf16."""
    from transformers import MistralForCausalLM

    config, x = tiny_mistral_config()
    for method, bits, dtype in [("none", 16, torch.float32), ("nf", 2, torch.bfloat16)]:
        # built in dtype as from_pretrained builds it (``.to(bf16)`` would also cast the rotary inv_freq)
        model = MistralForCausalLM._from_config(config, dtype=dtype).eval()
        quantize_model(model, bits, method=method, rank=4, alpha=8, progress=False, **PAPER)
        perturb_adapters(model)
        save_quantized(model, tmp_path / method)
        loaded = _from_pretrained(tmp_path / method)
        assert loaded.model.layers[0].mlp.up_proj.is_quantized == (method != "none")
        assert loaded.lm_head.weight.dtype == dtype
        assert torch.equal(logits(loaded, x), logits(model, x))


def test_save_is_atomic(quantized, saved, tmp_path, monkeypatch):
    model, _ = quantized
    path = _copy(saved, tmp_path / "ck")
    before = sorted(p.name for p in path.iterdir())
    changed = load_model()
    quantize_model(changed, 4, method="nf", rank=2, progress=False)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(ckpt_save, "save_safetensors_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(changed, path)
    monkeypatch.undo()
    assert sorted(p.name for p in path.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folder left behind
    assert torch.equal(logits(load_quantized(path)), logits(model))
    save_quantized(changed, path)  # a completed save replaces the folder
    assert json.loads((path / "config.json").read_text())["quantization_config"]["method"] == "nf"


def test_import_lowra_registers_before_transformers_is_imported(saved):
    code = (
        "import sys, lowra\n"
        "assert 'transformers' not in sys.modules and 'lowra.hf' not in sys.modules\n"
        "from transformers.quantizers import auto\n"
        "assert auto.AUTO_QUANTIZER_MAPPING['lowra'].__name__ == 'LowRAHfQuantizer'\n"
        "assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING['lowra'].__name__ == 'LowRAHfConfig'\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root,
                   env={"PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


# ---------------------------------------------------------------------------------- bad input
def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _write_config(path: Path, config: dict) -> None:
    (path / "config.json").write_text(json.dumps(config))


def test_plain_transformers_refuses_the_folder_without_import_lowra(saved):
    """Issue 32: without LowRA, transformers skips the unknown quant_method; the folder's guard tensor
    (uint8 [1] under a plain ``<layer>.weight`` name) makes it fail loudly instead of returning a model
    whose projections are random."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom transformers import AutoModelForCausalLM\n"
         f"AutoModelForCausalLM.from_pretrained({str(saved)!r})\nprint('LOADED')"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "LOADED" not in proc.stdout
    assert "ignore_mismatched_sizes" in proc.stderr and "MISMATCH" in proc.stdout + proc.stderr
    assert "Unknown quantization type, got lowra" in proc.stdout + proc.stderr
    loaded = _from_pretrained(saved)  # with lowra imported (this process) the guard is read and dropped
    assert not any(n.endswith(".weight") and isinstance(m, LowRALinear)
                   for n, m in loaded.named_modules())


def test_foreign_folders_are_refused(tmp_path):
    with pytest.raises(FormatError, match="not a LowRA checkpoint"):
        load_quantized(tmp_path)  # empty
    with pytest.raises(FormatError, match="no quantization_config with quant_method 'lowra'"):
        load_quantized(model_dir())  # a plain HF model
    assert not ckpt.is_checkpoint(model_dir()) and not ckpt.is_checkpoint(tmp_path)


def test_truncated_shard_and_non_safetensors_weights(saved, tmp_path):
    path = _copy(saved, tmp_path / "ck")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match="model.safetensors has .* bytes, lowra_checksums.json says .*truncated"):
        _from_pretrained(path)
    with pytest.raises(FormatError, match="model.safetensors has .* bytes but its header describes .*truncated"), \
            verification(False):  # the structural checks hold without the checksums too
        _from_pretrained(path)
    weights.write_bytes(b"\xff" * 8 + data[8:])  # a header length beyond the file
    with pytest.raises(FormatError, match="not a readable safetensors file"):
        _from_pretrained(path)
    with pytest.raises(FormatError, match="not a readable safetensors file"), verification(False):
        _from_pretrained(path)
    weights.write_bytes(data)
    weights.rename(path / "pytorch_model.bin")  # pickles are never read
    with pytest.raises(FormatError, match="model.safetensors is missing"):
        _from_pretrained(path)
    with pytest.raises(FormatError, match="safetensors files only"), verification(False):
        _from_pretrained(path)


def test_changed_bytes_fail_the_digest_and_nan_tables_fail_always(saved, tmp_path):
    from corrupt_testutils import flip_bytes

    path = _copy(saved, tmp_path / "ck")
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    for suffix in ("b2_codes", "b1_codebook", "absmax_codes", "lora_A"):
        flip_bytes(weights, f"{LAYER}.{suffix}")
        with pytest.raises(FormatError, match=rf"tensor {LAYER}\.{suffix} in model\.safetensors fails its sha256"):
            _from_pretrained(path)
        weights.write_bytes(good)
    flip_bytes(weights, f"{LAYER}.b2_codes")  # finite garbage: only the digest sees it
    with verification(False):
        _from_pretrained(path)
    assert load_quantized(path, verify=False) is not None
    weights.write_bytes(good)
    flip_bytes(weights, f"{LAYER}.b1_codebook", count=4, fill=0xFF)  # NaN in fp16
    with pytest.raises(FormatError, match="codebook .*NaN"), verification(False):
        _from_pretrained(path)


def test_dense_tensors_are_covered_by_digests(saved, tmp_path):
    """Embeddings, norms and every other non-LowRA tensor (issue 32: 4 bytes flipped inside
    ``embed_tokens`` loaded silently): every stored tensor is in ``layout`` or ``dense``."""
    from corrupt_testutils import tensor_names, tensor_span

    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    layout = {f"{n}.{s}" for n, spec in config["layout"].items() for s in spec["tensors"]}
    names = tensor_names(saved / "model.safetensors")
    assert set(names) <= layout | set(config["dense"]) and not layout & set(config["dense"])
    dense = [n for n in names if n in config["dense"]]
    assert any("embed_tokens" in n for n in dense) and any("norm" in n for n in dense)
    path = _copy(saved, tmp_path / "ck")
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    for name in dense:
        begin, end = tensor_span(weights, name)
        data = bytearray(good)
        middle = (begin + end) // 2
        data[middle] ^= 0x01  # one bit in the middle of the tensor, same size
        weights.write_bytes(bytes(data))
        with pytest.raises(FormatError, match=rf"tensor {name} in model\.safetensors fails its sha256 check"):
            _from_pretrained(path)
        with pytest.raises(FormatError, match=rf"tensor {name} .*fails its sha256 check"):
            load_quantized(path)
    weights.write_bytes(good)
    with verification(False):  # verify=False skips the hashing, as for the LowRA tensors
        data = bytearray(good)
        data[(tensor_span(weights, dense[0])[0] + tensor_span(weights, dense[0])[1]) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
        _from_pretrained(path)


def test_layout_mismatches_name_the_tensor(saved, tmp_path):
    path = _copy(saved, tmp_path / "ck")
    good = _config(path)
    changed = json.loads(json.dumps(good))
    changed["quantization_config"]["layout"][LAYER]["tensors"]["lora_A"]["shape"] = [3, 172]
    _write_config(path, changed)
    with pytest.raises(FormatError, match=r"config\.json has .* bytes, lowra_checksums\.json says .*truncated"):
        _from_pretrained(path)

    def refused(config: dict, match: str) -> None:
        _write_config(path, config)
        with pytest.raises(FormatError):
            _from_pretrained(path)  # the checksums (or the config's own checks) see it first
        with pytest.raises(FormatError, match=match), verification(False):
            _from_pretrained(path)  # and without them, the layout checks name the tensor

    bad = json.loads(json.dumps(good))
    bad["quantization_config"]["layout"][LAYER]["tensors"]["b2_codes"]["dtype"] = "I64"
    refused(bad, rf"tensor {LAYER}\.b2_codes is I32 .* but I64")
    bad = json.loads(json.dumps(good))
    bad["quantization_config"]["layout"][LAYER]["tensors"]["lora_A"]["shape"] = [3, 172]
    refused(bad, rf"tensor {LAYER}\.lora_A is F32 \[2, 172\] in the checkpoint but F32 \[3, 172\]")
    bad = json.loads(json.dumps(good))
    bad["quantization_config"]["layout"][LAYER]["shape"] = [64, 171]
    refused(bad, rf"layer '{LAYER}' has shape \[64, 172\] in this model but \[64, 171\]")
    bad = json.loads(json.dumps(good))
    bad["quantization_config"]["layout"]["model.layers.9.mlp.down_proj"] = bad["quantization_config"]["layout"][LAYER]
    refused(bad, "layer 'model.layers.9.mlp.down_proj' does not exist")
    bad = json.loads(json.dumps(good))
    bad["quantization_config"]["layout"][LAYER]["tensors"]["b7_codes"] = {"dtype": "I32", "shape": [1], "sha256": ""}
    refused(bad, "unknown tensor 'b7_codes'")
    bad = json.loads(json.dumps(good))
    bad["quantization_config"]["format_version"] = 99
    refused(bad, "format version 99")
    bad = json.loads(json.dumps(good))
    del bad["quantization_config"]["layout"][LAYER]
    refused(bad, rf"the checkpoint lacks tensors \['{LAYER}\.weight'\]")
    _write_config(path, good)
    stored = load_file(str(path / "model.safetensors"))
    del stored[f"{LAYER}.b1_rows"]
    save_file(stored, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match=rf"tensor {LAYER}\.b1_rows is missing"), verification(False):
        _from_pretrained(path)


@pytest.mark.gpu
def test_from_pretrained_on_cuda(quantized, saved):
    from transformers import AutoModelForCausalLM

    model, _ = quantized
    loaded = AutoModelForCausalLM.from_pretrained(str(saved), device_map="cuda")
    layer = dict(lowra_layers(loaded))[LAYER]
    assert layer.qweight.device.type == "cuda" and layer.lora_A.device.type == "cuda"
    x = X.cuda()
    on_gpu = load_quantized(saved, device="cuda")
    assert torch.equal(logits(loaded, x), logits(on_gpu, x))
    torch.testing.assert_close(logits(loaded, x).cpu(), logits(model), rtol=1e-3, atol=1e-3)
