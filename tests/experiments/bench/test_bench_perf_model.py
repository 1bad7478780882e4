"""``experiments.bench.perf_model``: the fit from the committed H200 data and SASS features reproduces
the committed ``results/bench/perf_model_fit.json`` and prints the table."""

from __future__ import annotations

import json

import pytest

from experiments.bench import perf_model as bpm


def test_refit_reproduces_the_committed_scores(tmp_path, capsys):
    report = bpm.main(["--out", str(tmp_path / "fit.json")])
    committed = json.loads(bpm.OUT.read_text())
    assert set(report["per_kernel_width"]) == {f"{k} {b}b" for k in ("lut_gemv", "dequantize") for b in (1, 2, 3, 4)}
    assert report["overall_loo"]["n"] == 164 and len(report["excluded_spilling"]) == 12
    for name, s in report["per_kernel_width"].items():
        c = committed["per_kernel_width"][name]
        for key in ("spearman", "median_rel_err", "max_rel_err"):
            assert s[key] == pytest.approx(c[key], rel=1e-4, abs=1e-6), (name, key)
        assert s["top_within_10pct"] == c["top_within_10pct"] and s["accepted"] == c["accepted"]
    assert {r["kernel"] for r in report["v2_estimates"]} == {"gemv_v2", "dequantize_v2"}
    out = capsys.readouterr().out
    assert "lut_gemv 2b" in out and "leave-one-out" in out and "ESTIMATES" in out


def test_measurements_cover_the_sweep_and_the_dequantize_configs():
    pts = bpm.measurements()
    assert sum(p["kernel"] == "lut_gemv" for p in pts) == 160
    assert sum(p["kernel"] == "dequantize" for p in pts) == 16
    assert all(p["us"] > 0 for p in pts)
