"""Launch plans and the shipped per-GPU config table: no autotuning at call time."""

import json
from pathlib import Path

import pytest
import torch
from kernel_testutils import DEVICE, mixed_bits, random_qtensor, requires_triton

from lowra_kernels import config_table, lut_matmul, tune

REPO = Path(__file__).resolve().parents[2]


def test_shipped_h200_table_is_the_profile_run_and_is_looked_up():
    """kernels/configs/nvidia_h200.json is what `python -m lowra_kernels.tune --from-profile` makes of the H200
    profile in results/bench/h200, and lookups find its entries (nearest in_features, same width/group/M)."""
    shipped = json.loads(config_table.table_path("NVIDIA H200").read_text())
    rebuilt = tune.from_profile(REPO / "results" / "bench" / "h200")
    assert shipped["gemv"] == rebuilt["gemv"] and shipped["dequantize"] == rebuilt["dequantize"]
    assert {e["bits"] for e in shipped["gemv"]} == {1, 2, 3, 4} == {e["bits"] for e in shipped["dequantize"]}
    got = config_table.lookup("NVIDIA H200", "gemv", 2, 64, 4096, block_m=1)  # nearest: in_features 11008
    assert got == next(e["config"] for e in shipped["gemv"] if e["bits"] == 2)
    assert config_table.lookup("NVIDIA H200", "gemv", 2, 64, 4096, block_m=16) is None
    assert config_table.lookup("NVIDIA H200", "gemv", 2, 128, 4096, block_m=1) is None
    assert config_table.lookup("Some Other GPU", "dequantize", 2, 64, 4096) is None
    assert config_table.device_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    with pytest.raises(ValueError, match="kernel"):
        config_table.lookup("NVIDIA H200", "gemm", 2, 64, 4096)


def test_gpu_configs_come_from_the_table_else_default_with_one_warning():
    lut_matmul.gemv_config.cache_clear()
    tuned = lut_matmul.gemv_config("NVIDIA H200", 4, 64, 1, 11008)
    assert tuned == {"BLOCK_N": 8, "SPLIT_K": 8, "num_warps": 4, "num_stages": 2}  # the H200 sweep's 4-bit winner
    with pytest.warns(RuntimeWarning, match="lowra_kernels.tune"):
        default = lut_matmul.gemv_config("Some Other GPU", 4, 64, 1, 11008)
    assert {"BLOCK_N", "SPLIT_K", "num_warps"} <= set(default)
    assert lut_matmul.gemv_config("", 2, 64, 1, 100)["BLOCK_N"] == lut_matmul.GEMV_CONFIGS[0].kwargs["BLOCK_N"]


@requires_triton
def test_gemv_plan_is_built_once_per_bucket_and_follows_in_place_edits():
    q = random_qtensor(40, 172, mixed_bits(40), seed=5)
    w = q.packed()
    x = torch.randn(1, 172, device=DEVICE)
    built = []
    real = lut_matmul._gemv_plan

    def counting(*args):
        built.append(args[1:])
        return real(*args)

    lut_matmul._plans = type(lut_matmul._plans)()  # a fresh cache for this test
    try:
        lut_matmul._gemv_plan = counting
        y1 = lut_matmul.lut_matmul(x, w, "triton")
        lut_matmul.lut_matmul(x, w, "triton")
        lut_matmul.lut_matmul(torch.randn(3, 172, device=DEVICE), w, "triton")  # another M bucket
        assert len(built) == 2
        q.groups[0].codebook.mul_(2)  # in place: the plan is rebuilt, the result follows
        y2 = lut_matmul.lut_matmul(x, w, "triton")
        assert len(built) == 3
    finally:
        lut_matmul._gemv_plan = real
    assert not torch.equal(y1, y2)
    torch.testing.assert_close(y2.cpu(), lut_matmul.lut_matmul_ref(x.cpu(), q.to("cpu").packed()), rtol=1e-4,
                               atol=1e-4)
