"""lowra.precision.highs.GapReporter: the stage-1 ILP logs its nodes and gap as it goes (issue 32, item 6),
and the plan is the same with the lines on or off (the callback only reads HiGHS' state)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

import lowra.progress
from lowra.precision import assign_precision

TABLE = Path(__file__).with_name("data") / "stories260k_kfac_seed6.npz"  # the hardest stories260K case


def _plan():
    t = np.load(TABLE)
    return assign_precision(t["errors"], t["params"], 1.15, candidates=tuple(int(c) for c in t["candidates"]),
                            layer_sizes=[int(s) for s in t["sizes"]], max_nodes=30)


def _gap_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: ILP")]


def test_gap_lines_leave_the_plan_unchanged(caplog, monkeypatch):
    monkeypatch.setattr(lowra.progress, "PLAIN_INTERVAL_S", 0.0)  # a line at every callback, not every 10 s
    caplog.set_level(logging.WARNING, logger="lowra")
    off = _plan()
    assert not _gap_lines(caplog)  # the lowra logger below INFO: no lines
    caplog.set_level(logging.INFO, logger="lowra")
    on = _plan()
    lines = _gap_lines(caplog)
    assert len(lines) >= 3, lines
    assert all(" nodes, gap " in line and "(best " in line and ", bound " in line for line in lines), lines
    nodes = [int(line.split()[2]) for line in lines]
    assert nodes == sorted(nodes) and nodes[-1] <= on.info["stage1_nodes"]
    assert np.array_equal(on.bits, off.bits) and on.objective == off.objective
    for key in ("stage1_nodes", "stage1_mip_gap", "stage1_status"):
        assert on.info[key] == off.info[key], key
