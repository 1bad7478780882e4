"""The runner's ``quant.stream``: config checks, the auto decision, and real streamed runs.

A streamed run of stories260K (the default quant=lowra at 2 bits: block-wise calibration, K-FAC
plan, calibrated init; and quant=lowra_paper at 1.5 bits) must give the same quantized model, hence
the same ``ppl_quantized`` / ``ppl_loftq``, as the in-memory run, and record per-stage peak memory
in results.json.
"""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

import lowra.streaming
from experiments.runner.config_check import CONF_DIR, ConfigError, check_config, streamable
from experiments.runner.run import run, use_streaming

FAST = [
    "+bits=1.5", "quant=lowra_paper", "train.max_steps=2", "train.batch_size=2", "train.seq_len=64",
    "eval.max_tokens=1024", "progress=false", "logger=none", "eval.fp=false",
]


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


def _cfg(overrides: list[str]):
    return compose(config_name="run", overrides=overrides)


def test_every_quant_option_has_stream_auto():
    from experiments.runner.config_check import group_options

    for name in group_options("quant"):
        assert _cfg([f"quant={name}"]).quant.stream == "auto", name


def test_stream_config_checks():
    with pytest.raises(ConfigError, match="quant.stream='maybe'"):
        check_config(_cfg(["quant.stream=maybe"]))
    # every config streams (block-wise calibration) but the dense base and the measured table
    check_config(_cfg(["quant.stream=true"]))
    with pytest.raises(ConfigError, match="dense bases"):
        check_config(_cfg(["quant=lora", "quant.stream=true"]))
    with pytest.raises(ConfigError, match="measures the loss of the whole model"):
        check_config(_cfg(["quant.error=measured", "quant.stream=true"]))
    check_config(_cfg(["quant=lowra_paper", "+bits=1.5", "quant.stream=true"]))
    for q in (["quant=lowra_paper"], ["quant=lowra"], ["quant=lowra", "quant.error=sse"], ["quant=qlora"],
              ["quant=modulora", "+bits=2"]):
        assert streamable(_cfg(q)) is None, q


def test_auto_streams_only_when_the_model_does_not_fit(monkeypatch):
    cpu = torch.device("cpu")
    cfg = _cfg(["quant=lowra_paper", "+bits=1.5"])
    size = lowra.streaming.checkpoint_bytes(cfg.model.pretrained, torch.float32)
    monkeypatch.setattr(lowra.streaming, "available_host_memory", lambda: 100 * size)
    assert use_streaming(cfg, cpu) is False
    monkeypatch.setattr(lowra.streaming, "available_host_memory", lambda: size)
    assert use_streaming(cfg, cpu) is True
    assert use_streaming(_cfg(["quant=lowra_paper", "quant.stream=false"]), cpu) is False
    assert use_streaming(_cfg(["quant=lowra"]), cpu) is True  # the default streams too (block-wise calibration)
    assert use_streaming(_cfg(["quant=lowra", "quant.error=measured"]), cpu) is False  # in memory whatever the size
    assert use_streaming(_cfg(["quant=lowra_paper", "quant.stream=true"]), cpu) is True


DEFAULT = ["+bits=2", *FAST[2:]]


@pytest.mark.parametrize("preset", [FAST, DEFAULT], ids=["lowra_paper", "lowra_default"])
def test_streamed_run_matches_the_in_memory_run(tmp_path, monkeypatch, preset):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    streamed = run(_cfg([*preset, "quant.stream=true"]), tmp_path / "stream")
    in_memory = run(_cfg([*preset, "quant.stream=false"]), tmp_path / "memory")
    assert streamed["memory"]["stream"] is True and in_memory["memory"]["stream"] is False
    assert streamed["ppl_quantized"] == pytest.approx(in_memory["ppl_quantized"], rel=1e-6)
    assert streamed["ppl_loftq"] == pytest.approx(in_memory["ppl_loftq"], rel=1e-6)
    assert streamed["bits_nominal"] == pytest.approx(in_memory["bits_nominal"])
    for r in (streamed, in_memory):
        stages = r["memory"]["stages"]["stages"]
        assert {"load", "quantize", "fine-tune"} <= set(stages)
        assert all(s["peak_rss_bytes"] > 0 for s in stages.values())
        assert r["peak_memory_bytes"] >= max(s["peak_rss_bytes"] for s in stages.values())
    calibration = {"calibration"} if preset is DEFAULT else set()
    assert set(streamed["memory"]["stream_stages"]) == {"setup", "pass1_codebooks", "plan", "pass2_quantize",
                                                         "assemble_save"} | calibration
    assert not (tmp_path / "stream" / "checkpoint" / "quantized.partial").exists()


def test_interrupted_streamed_run_resumes_its_blocks(tmp_path, monkeypatch):
    from lowra.streaming import passes

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real = passes.quantize_layer

    def crash(name, *args, **kwargs):
        if name.startswith("model.layers.2."):
            raise RuntimeError("simulated crash in pass 2")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(passes, "quantize_layer", crash)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(_cfg([*FAST, "quant.stream=true", "train.max_steps=0"]), run_dir)
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["resumable"] and failed["stage"] == "quantize"
    assert (run_dir / "checkpoint" / "quantized.partial" / "progress.json").exists()
    monkeypatch.setattr(passes, "quantize_layer", real)
    r = run(_cfg([*FAST, "quant.stream=true", "train.max_steps=0", "resume=true"]), run_dir)
    assert r["memory"]["stream_resumed_blocks"] == {"pass1": 5, "pass2": 2, "calibration": 0}
    assert r["ppl_quantized"] is not None and not (run_dir / "failed.json").exists()
