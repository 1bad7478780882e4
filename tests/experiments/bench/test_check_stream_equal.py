"""``python -m experiments.bench.check_stream_equal``: streamed == in memory on a real model (stories260K here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from experiments.bench.check_stream_equal import main

ASSETS = Path(os.environ.get("LOWRA_ASSETS") or Path(__file__).resolve().parents[3].parent / "shared" / "assets")


def test_check_stream_equal_on_stories(tmp_path):
    model = ASSETS / "models" / "stories260K"
    if not model.is_dir():
        pytest.fail(f"real model missing: {model} (set LOWRA_ASSETS)")
    out = tmp_path / "rec.json"
    rc = main(["--model", str(model), "--bits", "2", "--rank", "2", "--samples", "4", "--seq-len", "64",
               "--codebook-iters", "3", "--text", str(ASSETS / "corpora" / "tinystories_valid.txt"),
               "--work", str(tmp_path / "work"), "--json", str(out)])
    rec = json.loads(out.read_text())
    assert rc == 0 and rec["differing"] == [] and rec["only_in_one"] == [] and rec["tensors"] > 100
    assert "calibration" in rec["stream_stages"] and rec["times"]["calibration_s"] > 0
