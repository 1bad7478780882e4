"""SASS of the v2 kernels for sm_90 (no GPU: Triton's bundled ptxas; ``lowra_kernels.compile_check --sass``).

Guards what the v2 kernels reach (registers ≤ 96, no spills, 16-byte output stores, warp-instructions
per weight of the GEMV K loop at most the recorded values + 5 %) and the issue-29 SASS targets: no
barrier or shared-memory store in any GEMV K loop, one shuffle per code lookup and no other shuffle
there (a layout conversion would add some), ≤ 0.10 warp-instructions per weight at 2 bits and ≤ 0.15
at 4 bits (bf16, M = 1). Recorded results of equal input hash come from
``results/bench/kernels_sm90_static.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_kernel_compile import REPO, STATIC, requires_ptxas

pytestmark = requires_ptxas
# GEMV v2 K loop, warp-instructions per weight at M = 1 (sm_90, Triton 3.9; the largest of fp32/fp16/bf16)
RECORDED_GEMV_PER_WEIGHT = {1: 0.0922, 2: 0.0975, 3: 0.2089, 4: 0.1230}


@pytest.fixture(scope="module")
def v2_sass(tmp_path_factory):
    out = tmp_path_factory.mktemp("v2") / "v2.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "lowra_kernels.compile_check", "--arch", "90", "--kernels", "gemv_v2", "dequantize_v2",
         "--sass", "--jobs", str(max(1, min(8, os.cpu_count() or 1))), "--cache", str(STATIC), "--verify", "1",
         "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert proc.returncode == 0 and report["summary"]["cache_mismatches"] == 0, proc.stdout[-4000:]
    return report["results"]


def per_weight(r: dict) -> float:
    """Warp-instructions of one K-loop trip (``gemv_v2_step_tiles`` tiles of 128 codes of BLOCK_N rows)
    per weight."""
    from lowra_kernels.gemv_v2 import gemv_v2_step_tiles

    weights = r["config"]["BLOCK_N"] * 128 * gemv_v2_step_tiles(r["bits"])
    return r["sass"]["main_loop_instructions"] * r["num_warps"] / weights


def test_v2_registers_spills_and_stores(v2_sass):
    assert {r["kernel"] for r in v2_sass} == {"gemv_v2", "dequantize_v2"}
    for r in v2_sass:
        assert r["ok"] and r["spill_bytes"] == 0 and r["registers"] <= 96, (r["kernel"], r["bits"], r["registers"])
        if r["kernel"] == "dequantize_v2":
            stores = r["sass"]["kernel_mem"]["STG"]
            assert set(stores) == {"16"}, stores  # every output store is 16 bytes
            assert r["config"]["BLOCK_R"] * r["config"]["TILES"] * 128 * 2 >= 16 * 1024  # ≥ 16 KB a program (bf16)


def test_v2_gemv_loop_within_recorded_cost(v2_sass):
    for r in v2_sass:
        if r["kernel"] == "gemv_v2" and r["extra"]["BLOCK_M"] == 1:
            assert per_weight(r) <= RECORDED_GEMV_PER_WEIGHT[r["bits"]] * 1.05, (r["bits"], r["dtype"], per_weight(r))


def test_v2_gemv_no_barrier_in_k_loop(v2_sass):
    loops = [r["sass"]["main_loop_mem"] for r in v2_sass if r["kernel"] == "gemv_v2"]
    assert loops and all(m["BAR"] == 0 and "STS" not in m and "LDS" not in m for m in loops)


def test_v2_gemv_one_shuffle_per_lookup(v2_sass):
    """The K loop's shuffles are the code lookups, one per code of the thread's rows, M rows sharing
    each: any layout conversion between the loop's tensors (which would break the lane-table layout)
    would add shuffles or shared-memory traffic."""
    for r in (r for r in v2_sass if r["kernel"] == "gemv_v2"):
        rows_per_thread = r["config"]["BLOCK_N"] // (2 * r["num_warps"])
        codes_per_word = 16 if r["bits"] == 3 else 32 // r["bits"]
        assert r["sass"]["main_loop_mix"].get("SHFL") == rows_per_thread * 2 * codes_per_word, (r["bits"], r["extra"])


def test_v2_gemv_instruction_targets(v2_sass):
    got = {r["bits"]: per_weight(r) for r in v2_sass
           if r["kernel"] == "gemv_v2" and r["extra"]["BLOCK_M"] == 1 and r["dtype"] == "bfloat16"}
    assert got[2] <= 0.10 and got[4] <= 0.15, got
    for r in v2_sass:
        if r["kernel"] == "gemv_v2":
            assert r["registers"] <= 96 and r["spill_bytes"] == 0
