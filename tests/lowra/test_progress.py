"""lowra.progress's heartbeat: an open activity is never silent for longer than HEARTBEAT_S."""

from __future__ import annotations

import logging
import time

import lowra.progress as progress_mod


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
