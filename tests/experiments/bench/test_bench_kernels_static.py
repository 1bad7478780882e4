"""The static estimate's mixed-plan rows (pure arithmetic over the per-width rows; no compile)."""

import pytest

from experiments.bench.kernels import PLANS, static_mixes


def _row(bits, deq_us, floor_us):
    return {"bits": bits, "dequantize": {"estimate_us": deq_us, "bytes_floor_us": floor_us}}


def test_mixes_are_row_weighted_sums_of_the_width_launches():
    rows = [_row(1, 30.0, 30.0), _row(2, 40.0, 32.0), _row(4, 60.0, 36.0)]
    mixes = {m["plan"]: m for m in static_mixes(rows, t_gemm=200e-6)}
    assert set(mixes) == {p for p, plan in PLANS.items() if len(plan) > 1 and set(plan) <= {1, 2, 4}}
    m = mixes["mix1.5"]
    assert m["dequantize"]["estimate_us"] == pytest.approx(35.0)
    assert m["dequantize"]["pct_of_hbm_peak"] == pytest.approx(100 * 31.0 / 35.0)
    assert m["train_fwd_bwd_m2048"]["ratio_vs_bf16"] == pytest.approx((2 * 35.0 + 400.0) / 400.0)
    assert mixes["mix2.5"]["dequantize"]["estimate_us"] == pytest.approx(0.75 * 40.0 + 0.25 * 60.0)


def test_mixes_skip_plans_with_a_width_not_estimated():
    assert [m["plan"] for m in static_mixes([_row(1, 30.0, 30.0), _row(2, 40.0, 32.0)], 1e-4)] == [
        "mix1.15", "mix1.5"]
