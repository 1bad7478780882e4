"""lowra.progress: plain log lines off a terminal, so no quantization stage is silent in a log file."""

from __future__ import annotations

import logging
import time

import pytest

import lowra.progress as progress_mod
from experiments.eval.stories import load_model
from lowra.model_quantization import quantize_model


def test_plain_lines_at_start_interval_and_end(monkeypatch, caplog):
    monkeypatch.setattr(progress_mod, "_is_terminal", lambda: False)
    monkeypatch.setattr(progress_mod, "PLAIN_INTERVAL_S", 0.0)  # a line after every item
    with caplog.at_level(logging.INFO, logger="lowra"):
        assert list(progress_mod.progress(range(3), "codebooks", True)) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records if r.name == "lowra"]
    assert lines[0] == "codebooks: 0/3 layers"
    assert lines[1].startswith("codebooks: 1/3 layers · ") and "s left" in lines[1]
    assert lines[-1].startswith("codebooks: 3/3 layers · ") and "left" not in lines[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lowra"):
        assert list(progress_mod.progress(range(3), "codebooks", False)) == [0, 1, 2]  # off: silent
    assert not [r for r in caplog.records if r.name == "lowra"]


def test_quantize_model_reports_every_stage_in_a_log(monkeypatch, caplog):
    """Off a terminal (a Hydra log, a batch job), each stage of quantize_model logs its progress."""
    monkeypatch.setattr(progress_mod, "_is_terminal", lambda: False)
    model = load_model()
    with caplog.at_level(logging.INFO, logger="lowra"):
        quantize_model(model, 1.5, rank=2, codebook_iters=5, error="relative", init="loftq",
                       plan_options={"clusters": 8, "samples": 0, "max_nodes": 50}, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "lowra"]
    for start in ("codebooks: 0/35 layers", "codebooks: 35/35 layers", "plan: 3000 rows of 35 layers at 1.5 bits",
                  "plan: ", "quantize (lowra): 35/35 layers"):
        assert any(line.startswith(start) for line in lines), (start, lines)
    assert any("gap to the LP bound" in line for line in lines)


def test_progress_false_is_silent(monkeypatch, caplog):
    monkeypatch.setattr(progress_mod, "_is_terminal", lambda: False)
    model = load_model()
    with caplog.at_level(logging.INFO, logger="lowra"):
        quantize_model(model, 2.0, rank=0, codebook_iters=5, error="relative",
                       plan_options={"clusters": 8, "samples": 0, "max_nodes": 50}, progress=False)
    assert not [r for r in caplog.records if r.name == "lowra"]


def test_quantize_pretrained_reports_every_stage_per_layer_or_chunk(monkeypatch, caplog, tmp_path):
    """Streamed default (block-wise calibration, K-FAC plan, calibrated init): every stage logs lines
    per chunk (calibration sweeps) or per layer (pass 1, pass 2), not per block."""
    import torch

    from experiments.eval.stories import model_dir
    from lowra.streaming import quantize_pretrained

    monkeypatch.setattr(progress_mod, "_is_terminal", lambda: False)
    windows = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="lowra"):
        quantize_pretrained(model_dir(), tmp_path / "q", rank=2, alpha=4, codebook_iters=3, calibration=windows,
                            plan_options={"clusters": 8, "samples": 0, "max_nodes": 50}, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "lowra"]
    for start in ("calibration forward (block by block): 0/5 chunks", "calibration backward (block by block): 5/5",
                  "pass 1 (codebooks): 0/35 layers", "pass 1 (codebooks): 35/35 layers",
                  "pass 2 (quantize): 35/35 layers"):
        assert any(line.startswith(start) for line in lines), (start, lines)


# ------------------------------------------------------------ heartbeat: an open activity is never silent
@pytest.fixture(autouse=True)
def _no_activity_from_elsewhere(monkeypatch):
    """Each test starts with no open activity (one left open by an earlier test's code would beat)."""
    monkeypatch.setattr(progress_mod._HEARTBEAT, "open", [])

def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lowra"]


def test_a_silent_activity_gets_heartbeats(monkeypatch, caplog):
    monkeypatch.setattr(progress_mod, "_is_terminal", lambda: False)
    monkeypatch.setattr(progress_mod, "HEARTBEAT_S", 0.3)
    with caplog.at_level(logging.INFO, logger="lowra"):
        with progress_mod.activity("plan", True):
            with progress_mod.activity("plan: stage 1 (cluster ILP)"):  # inherits the outer switch
                time.sleep(1.2)
        time.sleep(0.8)  # closed: no more heartbeats
    beats = [line for line in _lines(caplog) if ": working · " in line]
    assert len(beats) >= 2, beats
    assert all(line.startswith("plan: stage 1 (cluster ILP): working · ") for line in beats), beats
    seconds = [float(line.rsplit("· ", 1)[1].removesuffix(" s")) for line in beats]
    assert seconds == sorted(seconds) and seconds[-1] <= 1.3
    assert not progress_mod._HEARTBEAT.open


def test_no_heartbeat_when_switched_off_or_lines_keep_coming(monkeypatch, caplog):
    monkeypatch.setattr(progress_mod, "_is_terminal", lambda: False)
    monkeypatch.setattr(progress_mod, "HEARTBEAT_S", 0.4)
    with caplog.at_level(logging.INFO, logger="lowra"):
        with progress_mod.activity("calibration", False):
            with progress_mod.activity("plan: LP rounding"):  # no enabled outer activity: nothing
                time.sleep(0.9)
        with progress_mod.activity("codebooks", True):
            for i in range(8):
                progress_mod.log.info("codebooks: %d/8 layers", i)  # a line every 0.15 s
                time.sleep(0.15)
    assert not [line for line in _lines(caplog) if ": working · " in line]


def test_plain_progress_heartbeat_names_the_items_done(monkeypatch, caplog):
    monkeypatch.setattr(progress_mod, "_is_terminal", lambda: False)
    monkeypatch.setattr(progress_mod, "HEARTBEAT_S", 0.3)
    monkeypatch.setattr(progress_mod, "PLAIN_INTERVAL_S", 100.0)
    with caplog.at_level(logging.INFO, logger="lowra"):
        ticker = progress_mod.Ticker("calibration forward", 3, True, unit="chunk")
        ticker.tick()
        time.sleep(0.8)  # one long chunk
        ticker.tick()
        ticker.tick()
    lines = _lines(caplog)
    assert any(line.startswith("calibration forward: 1/3 chunks done: working · ") for line in lines), lines
    assert lines[-1].startswith("calibration forward: 3/3 chunks · ")
    assert not progress_mod._HEARTBEAT.open
