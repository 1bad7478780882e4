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


def test_quantize_peaks_from_measured_layers(tmp_path, capsys):
    """The fit recovers a known per-layer law, and the 70B streamed peak is that law at 70B shapes + the rest."""
    law = {"pass1": (6.0, 2.0, 1e6), "pass2": (3.0, 12.0, 2e6)}  # bytes per out·in, per in², constant
    measured = [{"out": o, "in": i, "phase": ph, "peak_above_inputs_bytes": a * o * i + b * i * i + c}
                for o, i in ((576, 1536), (1536, 576), (1024, 2816), (2816, 1024)) for ph, (a, b, c) in law.items()]
    m = fit_table.MODELS["70B"]
    peaks = fit_table.quantize_peaks(m, measured)
    worst = max(4 * o * i + 8 * i * i + 3.0 * o * i + 12.0 * i * i + 2e6 for o, i in fit_table.projections(m))
    assert peaks["pass2"] > worst  # plus the codebooks and error tables of every row
    assert peaks["pass2"] - worst < 2e9
    path = tmp_path / "peaks.json"
    path.write_text(json.dumps({"rows": measured}))
    fit_table.main(["--json", str(tmp_path / "fit.json"), "--quantize", str(path)])
    out = json.loads((tmp_path / "fit.json").read_text())["quantize"]
    assert {r["model"] for r in out["rows"]} == set(fit_table.MODELS)
    assert "Streamed quant=lowra" in capsys.readouterr().out
    with pytest.raises(ValueError, match="needs ≥ 3 measured"):
        fit_table.quantize_peaks(m, measured[:2])
