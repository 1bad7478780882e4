"""The computed "what fits where" table: storage from the format, the fractional-budget mix."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.bench import fit_table
from lowra import quantize


def test_width_mix_averages_to_the_budget():
    for bits in fit_table.BITS:
        mix = fit_table.width_mix(bits)
        assert sum(mix.values()) == pytest.approx(1.0)
        assert sum(b * f for b, f in mix.items()) == pytest.approx(bits)
    assert fit_table.width_mix(1.15) == pytest.approx({1: 0.85, 2: 0.15})


def test_base_bytes_match_a_real_quantized_tensor():
    """At an integer width the computed bytes are the stored bytes of real QuantizedTensors."""
    m = dict(hidden=128, ffn=320, layers=1, heads=4, kv_heads=2, vocab=64, tied=True)
    stored = 0
    for out, inp in fit_table.projections(m):
        qt = quantize(torch.randn(out, inp), 2, method="lowra", group_size=64)
        stored += qt.nbytes
    assert fit_table.base_bytes(m, 2.0) == pytest.approx(stored)


def test_table_rows_and_json(tmp_path, capsys):
    rows = fit_table.main(["--json", str(tmp_path / "fit.json")])
    assert len(rows) == len(fit_table.MODELS) * len(fit_table.BITS)
    by = {(r["model"], r["bits"]): r for r in rows}
    assert by[("70B", 4.0)]["fits"] == {"24": False, "48": False, "80": True}
    assert by[("70B", 1.15)]["fits"]["48"] and by[("7B", 1.15)]["fits"]["24"]
    for r in rows:
        parts = r["base_gb"] + r["adapters_gb"] + r["optimizer_gb"] + r["activations_gb"]
        assert r["total_gb"] == pytest.approx(parts)
    assert json.loads((tmp_path / "fit.json").read_text())["computed"] is True
    assert "| 70B | 1.15 |" in capsys.readouterr().out
