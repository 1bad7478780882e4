"""Streaming quantization (``lowra.streaming.quantize_pretrained``) against the in-memory path.

The real stories260K and a small sharded synthetic Llama are quantized both ways with the same
config — the default ``LowRAConfig()`` (K-FAC table and calibrated init from block-wise calibration)
and data-free ones; the saved stream result must hold the same codes, codebooks, scales, plan and
adapters, bit for bit, and give the same logits. An interrupted run resumes at block granularity.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowra
from experiments.bench.streaming import write_synthetic_llama
from lowra import streaming
from lowra.config import PAPER
from lowra.streaming import checkpoint_bytes, quantize_pretrained

ASSETS = Path(os.environ.get("LOWRA_ASSETS") or Path(__file__).resolve().parents[2].parent / "shared" / "assets")
STORIES = ASSETS / "models" / "stories260K"
PLAN = {"clusters": 16, "samples": 0, "max_nodes": 200}


def _in_memory(path: Path, dtype: torch.dtype, **kw):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    torch.manual_seed(0)
    report = lowra.quantize_model(model, progress=False, **kw)
    return model, report


def _streamed(path: Path, out: Path, dtype: torch.dtype, **kw):
    torch.manual_seed(0)
    result = quantize_pretrained(path, out, dtype=dtype, progress=False, **kw)
    return lowra.load_quantized(out), result


def _assert_same(a: torch.nn.Module, b: torch.nn.Module, adapters: bool = True) -> None:
    la, lb = dict(lowra.lowra_layers(a)), dict(lowra.lowra_layers(b))
    assert la.keys() == lb.keys() and la
    for name in la:
        sa, sb = la[name].qweight.state_dict(), lb[name].qweight.state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}/{k} differs"
        assert torch.equal(la[name].qweight.bits_per_row, lb[name].qweight.bits_per_row)
        if adapters and la[name].rank:
            assert torch.equal(la[name].lora_A, lb[name].lora_A), name
            assert torch.equal(la[name].lora_B, lb[name].lora_B), name


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A 3-block Llama (GQA, untied lm_head) in fp32 shards of ≤ 64 kB (several shards per block)."""
    path = tmp_path_factory.mktemp("synth")
    facts = write_synthetic_llama(path, hidden=64, ffn=160, layers=3, vocab=128, heads=4, kv_heads=2, tied=False,
                                  max_shard_bytes=64 << 10)
    assert facts["shards"] > 3
    return path


def _windows(vocab: int, n: int = 8, seq_len: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(3))


def _both_ways(path: Path, out: Path, dtype: torch.dtype, config: lowra.LowRAConfig, vocab: int):
    """Quantize ``path`` in memory and streamed with ``config`` on the same windows; assert the same
    codes, adapters and logits; ``(in-memory model, streamed model, report, StreamResult)``."""
    calibration = _windows(vocab)
    ref, report = _in_memory(path, dtype, config=config, calibration=calibration)
    got, result = _streamed(path, out, dtype, config=config, calibration=calibration)
    _assert_same(ref, got)
    x = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ref(x).logits, got(x).logits)
    return ref, got, report, result


@pytest.mark.parametrize("bits", [2.0, 1.5])
def test_default_streams_and_matches_in_memory_on_stories(tmp_path, bits):
    """``LowRAConfig()`` (K-FAC plan over {1,2,3,4}, calibrated init; at 1.5 bits the low-bit init's 4
    relearning alternations) streamed from stories260K: the block-wise statistics are the in-memory
    ones, so codes, plan, adapters and logits are identical bit for bit."""
    if not STORIES.is_dir():
        pytest.fail(f"real model missing: {STORIES} (set LOWRA_ASSETS)")
    config = lowra.LowRAConfig(bits=bits, rank=2, alpha=4.0, codebook_iters=5, plan_options=PLAN)
    ref, got, report, result = _both_ways(STORIES, tmp_path / "q", torch.float32, config, vocab=512)
    assert result.report.plan["objective"] == report.plan["objective"]
    assert result.report.error_table == "kfac" and result.report.init == "calibrated"
    assert result.report.low_bits_init == (bits < 2)
    assert "calibration" in result.stages and result.report.times["calibration_s"] > 0
    assert not (tmp_path / "q.partial").exists()


@pytest.mark.parametrize("tied", [False, True])
def test_default_streams_and_matches_in_memory_on_sharded_llama(tmp_path, tied):
    """The default on a sharded synthetic Llama (GQA; tied or untied head), bf16: bit for bit."""
    path = tmp_path / "src"
    write_synthetic_llama(path, hidden=64, ffn=160, layers=3, vocab=128, heads=4, kv_heads=2, tied=tied,
                          max_shard_bytes=64 << 10)
    config = lowra.LowRAConfig(rank=4, alpha=8.0, codebook_iters=3, plan_options=PLAN)
    ref, got, _, _ = _both_ways(path, tmp_path / "q", torch.bfloat16, config, vocab=128)
    assert got.lowra_config == ref.lowra_config == config


def test_stories_matches_quantize_model_bit_for_bit(tmp_path):
    """The real tiny model at 1.5 bits (the paper preset: SSE plan + LoftQ): identical codes, adapters and logits."""
    if not STORIES.is_dir():
        pytest.fail(f"real model missing: {STORIES} (set LOWRA_ASSETS)")
    kw = dict(bits=1.5, rank=4, alpha=8.0, loftq_iters=1, codebook_iters=5, plan_options=PLAN, **PAPER)
    ref, report = _in_memory(STORIES, torch.float32, **kw)
    got, result = _streamed(STORIES, tmp_path / "q", torch.float32, **kw)
    _assert_same(ref, got)
    x = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ref(x).logits, got(x).logits)
    assert result.report.plan["objective"] == pytest.approx(report.plan["objective"])
    assert result.report.bits_nominal == pytest.approx(report.bits_nominal)
    assert [lr.name for lr in result.report.layers] == [lr.name for lr in report.layers]
    assert set(result.stages) == {"setup", "pass1_codebooks", "plan", "pass2_quantize", "assemble_save"}
    assert all(s["peak_rss_bytes"] > 0 for s in result.stages.values())
    assert not (tmp_path / "q.partial").exists()  # the work directory is removed at the end
    assert json.loads((tmp_path / "q" / "lowra_report.json").read_text())["bits_target"] == 1.5


@pytest.mark.parametrize("kw", [
    dict(bits=2.0, rank=4, alpha=8.0, loftq_iters=1, codebook_iters=3, candidates=(1, 2, 4), error="relative",
         init="loftq", budget_kind="nominal", double_quant=True),
    dict(bits=3.0, method="nf", rank=4, alpha=8.0, loftq_iters=0),
    dict(bits=2.0, rank=4, alpha=8.0, loftq_iters=1, plan="uniform", codebook_iters=3, error="sse", init="loftq"),
    dict(bits=1.5, rank=4, alpha=8.0, loftq_iters=1, codebook_iters=3, error="sse", init="loftq",
         low_bits_init={"below": 2.0, "loftq_iters": 2, "init_codebooks": "relearn"}),
], ids=["lowra-relative-dq", "nf3-lora-init", "lowra-uniform-plan", "lowra-low-bits-init"])
def test_synthetic_sharded_llama_matches_bit_for_bit(synth, tmp_path, kw):
    """Sharded source, bf16 compute dtype, untied lm_head kept dense; several methods/options."""
    kw = {**kw, "plan_options": PLAN} if kw.get("method", "lowra") == "lowra" else kw
    ref, _ = _in_memory(synth, torch.bfloat16, **kw)
    got, result = _streamed(synth, tmp_path / "q", torch.bfloat16, **kw)
    _assert_same(ref, got)
    # the same LowRAConfig as the in-memory path: in config.json, the report and on the loaded model
    expected = ref.lowra_config.to_dict()
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["lowra_config"] == expected
    assert result.report.config == expected == json.loads((tmp_path / "q" / "lowra_report.json").read_text())["config"]
    assert got.lowra_config == ref.lowra_config
    assert result.report.loftq_iters == ref.lowra_report.loftq_iters
    assert result.report.low_bits_init == ("low_bits_init" in kw)
    assert got.lm_head.weight.dtype == torch.bfloat16 and torch.equal(got.lm_head.weight, ref.lm_head.weight)
    x = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ref(x).logits, got(x).logits)


def test_resume_after_interruption_at_block_granularity(synth, tmp_path, monkeypatch):
    """The default config: an interrupted run resumes its calibration, pass-1 and pass-2 blocks."""
    kw = dict(bits=1.5, rank=4, alpha=8.0, loftq_iters=1, codebook_iters=3, plan_options=PLAN, dtype=torch.float32,
              progress=False, calibration=_windows(128))
    torch.manual_seed(0)
    full = quantize_pretrained(synth, tmp_path / "full", **kw)
    assert full.resumed == {"pass1": 0, "pass2": 0, "calibration": 0}

    from lowra.streaming import passes

    real = passes.quantize_layer
    calls = []

    def crash_in_second_block(name, *args, **kwargs):
        calls.append(name)
        if name.startswith("model.layers.1."):
            raise KeyboardInterrupt("simulated crash")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(passes, "quantize_layer", crash_in_second_block)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        quantize_pretrained(synth, tmp_path / "q", **kw)
    partial = tmp_path / "q.partial"
    progress = json.loads((partial / "progress.json").read_text())
    assert progress["pass1"] == [0, 1, 2] and progress["plan"] is True and progress["pass2"] == [0]
    assert progress["calibration"] is True
    assert not (tmp_path / "q").exists()

    monkeypatch.setattr(passes, "quantize_layer", real)
    resumed = quantize_pretrained(synth, tmp_path / "q", **kw)
    assert resumed.resumed == {"pass1": 3, "pass2": 1, "calibration": 1}
    _assert_same(lowra.load_quantized(tmp_path / "full"), lowra.load_quantized(tmp_path / "q"), adapters=False)
    assert not partial.exists()


def test_resume_refuses_other_options_and_restarts_on_request(synth, tmp_path, monkeypatch):
    kw = dict(rank=4, alpha=8.0, loftq_iters=0, codebook_iters=2, plan_options=PLAN, progress=False, **PAPER)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash")

    from lowra.streaming import passes

    monkeypatch.setattr(passes, "quantize_layer", crash)
    with pytest.raises(KeyboardInterrupt):
        quantize_pretrained(synth, tmp_path / "q", bits=1.5, **kw)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="other options"):
        quantize_pretrained(synth, tmp_path / "q", bits=2.0, **kw)
    result = quantize_pretrained(synth, tmp_path / "q", bits=2.0, resume=False, **kw)
    assert result.resumed == {"pass1": 0, "pass2": 0, "calibration": 0}
    assert lowra.load_quantized(tmp_path / "q").config.quantization_config.options["bits"] == 2.0


@pytest.mark.parametrize("kw, match", [
    (dict(error="kfac"), "quant.error=kfac needs calibration data: pass `calibration=`"),
    (dict(error="fisher"), "quant.error=fisher needs calibration data"),
    (dict(error="sse"), "quant.init=calibrated needs calibration data"),
    (dict(error="measured"), "measures the loss of the whole model"),
    (dict(method="none"), "nothing to stream-quantize"),
    (dict(method="optq", bits=2.0), "'optq' needs calibration data"),
    (dict(calibration=torch.zeros(2, 8)), "integer token windows"),
    (dict(method="nf", bits=1.5), "integer width"),
    (dict(bits=5.0), "bit budget"),
    (dict(dtype="float99"), "torch dtype"),
])
def test_unstreamable_or_bad_options_raise(synth, tmp_path, kw, match):
    kw = {"bits": 1.5, **kw}
    with pytest.raises(ValueError, match=match):
        quantize_pretrained(synth, tmp_path / "q", progress=False, **kw)
    assert not (tmp_path / "q").exists()


def test_bad_sources_raise(tmp_path, synth):
    with pytest.raises(ValueError, match="no safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text((synth / "config.json").read_text())
        quantize_pretrained(tmp_path / "empty", tmp_path / "q", bits=2.0, progress=False, **PAPER)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in synth.iterdir():
        (broken / f.name).symlink_to(f)
    index = json.loads((synth / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (broken / "model.safetensors.index.json").unlink()
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="up_proj.weight"):
        quantize_pretrained(broken, tmp_path / "q", bits=2.0, progress=False, **PAPER)


def test_nan_weight_is_named(tmp_path):
    path = tmp_path / "nan"
    write_synthetic_llama(path, hidden=32, ffn=64, layers=2, vocab=64, heads=2, kv_heads=2)
    from safetensors.torch import load_file, save_file

    shard = next(path.glob("model-*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.1.self_attn.v_proj.weight"][0, 0] = float("nan")
    save_file(tensors, shard)
    with pytest.raises(ValueError, match="model.layers.1.self_attn.v_proj"):
        quantize_pretrained(path, tmp_path / "q", bits=2.0, progress=False, **PAPER)


def test_checkpoint_bytes_and_peak_memory(synth):
    stored = checkpoint_bytes(synth)
    assert stored == sum(f.stat().st_size for f in synth.glob("model-*.safetensors"))
    n = streaming.ShardReader(synth).numel()
    assert checkpoint_bytes(synth, torch.bfloat16) == 2 * n
    # In a fresh child process: this process's peak and allocator pools are whatever earlier tests left.
    child = subprocess.run([sys.executable, "-c", PEAK_CHILD], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    peaks = json.loads(child.stdout.strip().splitlines()[-1])
    st = peaks["stages"]["alloc"]
    assert st["time_s"] >= 0 and st["peak_rss_bytes"] >= st["rss_start_bytes"]
    assert peaks["process_peak_rss_bytes"] >= st["peak_rss_bytes"]
    if peaks["peak_resettable"]:
        assert st["peak_rss_bytes"] - st["rss_start_bytes"] >= 60 << 20
        assert peaks["stages"]["after"]["peak_rss_bytes"] - peaks["stages"]["after"]["rss_start_bytes"] < 60 << 20
    assert peaks["held"] - peaks["after_release"] > 150 << 20, peaks  # malloc_trim returned the freed heap


PEAK_CHILD = """
import json
import torch
from lowra.streaming import PeakMemory
peaks = PeakMemory()
with peaks.stage("alloc"):
    x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB touched
    del x
with peaks.stage("after"):  # the reset forgets the previous stage's peak
    y = torch.ones(1 << 20, dtype=torch.uint8)
    del y
out = peaks.to_dict()
# freed heap blocks that glibc keeps: a 16 MiB free raises its mmap threshold, 1 MiB blocks then come from the
# heap, and one block kept at the top stops the automatic trim; release=True hands the rest back at a stage start
big = torch.ones(16 << 20, dtype=torch.uint8)
del big
small = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(200)]
keep = torch.ones(1 << 20, dtype=torch.uint8)
del small
from lowra.streaming import current_rss
out["held"] = current_rss()
released = PeakMemory(release=True)
with released.stage("next"):
    pass
out["after_release"] = released.stages["next"]["rss_start_bytes"]
print(json.dumps(out))
"""
