"""The performance model (``lowra_kernels.perf_model``): its terms, its fit and its scores."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lowra_kernels import perf_model as pm

SASS = pm.Sass(registers=64, shared_bytes=0, loop_instr=200, rest_instr=100, loop_smem=0, rest_smem=0, loop_bar=0,
               rest_bar=0, ldg_bytes=16)


def launch(grid: int = 1024, warps: int = 4, trips: int = 20, nbytes: float = 20e6, **sass) -> pm.Launch:
    return pm.Launch(grid=grid, warps=warps, trips=trips, bytes=nbytes, resident=False, sass=replace(SASS, **sass))


def test_occupancy_from_registers_shared_memory_and_warps():
    assert pm.occupancy(replace(SASS, registers=64), 4, pm.H100) == 8  # 64 regs × 128 threads: 8 CTAs
    assert pm.occupancy(replace(SASS, registers=255), 8, pm.H100) == 1
    assert pm.occupancy(replace(SASS, registers=32, shared_bytes=100 * 1024), 4, pm.H100) == 2
    assert pm.occupancy(replace(SASS, registers=16), 1, pm.H100) == 32  # the CTA limit


def test_terms_respond_to_bytes_instructions_barriers_and_peaks():
    c = pm.Constants(rho=0.0)
    base = pm.terms(launch(), pm.H100, c)
    assert pm.terms(launch(nbytes=40e6), pm.H100, c)["t_mem"] == pytest.approx(2 * base["t_mem"])
    assert pm.terms(launch(loop_instr=400, rest_instr=200), pm.H100, c)["t_issue"] == pytest.approx(2 * base["t_issue"])
    assert pm.terms(launch(loop_bar=2), pm.H100, c)["us"] > base["us"]
    # HBM-bound launch: the H200's higher peak predicts a shorter time
    heavy = launch(nbytes=400e6)
    assert pm.predict(heavy, pm.H200, c) < pm.predict(heavy, pm.H100, c)


def test_littles_law_caps_bandwidth_when_little_is_in_flight():
    c = pm.Constants()
    few = pm.terms(launch(grid=8, nbytes=50e6, ldg_bytes=4), pm.H100, c)
    many = pm.terms(launch(grid=4096, nbytes=50e6, ldg_bytes=16), pm.H100, c)
    assert few["bw_gbps"] == pytest.approx(few["little_gbps"]) and few["bw_gbps"] < many["bw_gbps"]


def test_fit_recovers_constants_of_synthetic_data_and_loo_predicts_them():
    rng = np.random.default_rng(0)
    truth = pm.Constants(fixed_us=4.0, eta_hbm=0.7, eta_issue=0.6, cpi=5.0, latency_ns=600.0, rho=0.2)
    launches = [launch(grid=int(g), warps=int(w), trips=int(t), nbytes=float(b), loop_instr=int(i))
                for g, w, t, b, i in zip(rng.integers(64, 4096, 40), rng.choice([4, 8], 40), rng.integers(5, 80, 40),
                                         rng.uniform(5e6, 2e8, 40), rng.integers(50, 600, 40))]
    measured = pm.predict_many(launches, pm.H200, truth)
    c = pm.fit(launches, measured, pm.H200)
    np.testing.assert_allclose(pm.predict_many(launches, pm.H200, c), measured, rtol=1e-3)
    loo = pm.leave_one_out(launches[:12], measured[:12], pm.H200, c)
    np.testing.assert_allclose(loo, measured[:12], rtol=2e-2)


def test_scores():
    s = pm.scores([1.0, 2.0, 3.0, 4.0], [1.1, 2.2, 2.9, 4.4])
    assert s["spearman"] == pytest.approx(1.0) and s["top_within_10pct"]
    assert s["median_rel_err"] == pytest.approx(np.median([0.1 / 1.1, 0.2 / 2.2, 0.1 / 2.9, 0.4 / 4.4]))
    bad = pm.scores([4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0])
    assert bad["spearman"] == pytest.approx(-1.0) and not bad["top_within_10pct"]
