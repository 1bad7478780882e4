"""The layer benchmark of trainable codebooks (experiments/bench/trainable_tables_layer.py) on a tiny shape."""

from __future__ import annotations

from experiments.bench.trainable_tables_layer import VARIANTS, bench_shape, build_layer


def test_bench_shape_reports_every_variant_and_the_kept_output():
    rows = bench_shape("24x64", 1.15, tokens=32, rounds=1, steps=1)
    assert [r["variant"] for r in rows] == list(VARIANTS)
    by = {r["variant"]: r for r in rows}
    assert by["frozen"]["ratio_vs_frozen"] == 1.0 and all(r["median_step_cpu_s"] > 0 for r in rows)
    table_bytes = [by[v]["table_param_bytes"] for v in VARIANTS]
    assert table_bytes[0] == 0 < table_bytes[1] < table_bytes[2]
    # trainable codebooks of 1-bit rows keep the layer's output [32, 24] fp32 for the backward (the closed
    # form); with trainable scales too there is no closed form, so the output is not kept
    output_bytes = 32 * 24 * 4
    extra = {v: by[v]["saved_for_backward_bytes"] - by["frozen"]["saved_for_backward_bytes"] for v in VARIANTS}
    assert extra["codebooks"] >= output_bytes, extra
    assert 0 <= extra["scales"] < output_bytes, extra


def test_build_layer_same_weight_for_every_variant():
    a, _ = build_layer(16, 64, 1.5, "frozen")
    b, params = build_layer(16, 64, 1.5, "codebooks")
    assert [g.bits for g in a.qweight.groups] == [g.bits for g in b.qweight.groups]
    assert len(params) == 2 + len(b.qweight.groups)
