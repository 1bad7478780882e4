"""Every Triton kernel × shipped autotune config × bit-width × dtype compiles for sm_90 and sm_80.

No GPU is needed: Triton's bundled ptxas builds the binaries for a ``GPUTarget``. The compile runs
in a subprocess (``python -m lowra_kernels.compile_check``) because this session runs the interpreter
(``TRITON_INTERPRET=1`` replaces ``triton.jit``). Both targets get every config. Fails on any compile
error, on any variant that spills registers to local memory, and on configs of one kernel that
compile to identical SASS. A variant whose input hash (kernel source with its dependencies,
arguments, config, target, Triton version) equals one recorded in the committed
``results/bench/kernels_sm90_static.json`` (``make kernels-compile``) takes the recorded result;
the others compile, and ``--verify`` recompiles a few recorded ones and fails if any differs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "results" / "bench" / "kernels_sm90_static.json"


def _nvidia_tools() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    bin_dir = Path(spec.origin).parent / "backends" / "nvidia" / "bin"
    return all((bin_dir / t).exists() for t in ("ptxas", "cuobjdump"))


requires_ptxas = pytest.mark.skipif(not _nvidia_tools(), reason="triton without its NVIDIA backend tools")


@requires_ptxas
def test_every_kernel_config_compiles_for_sm90_without_spills(tmp_path):
    out = tmp_path / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = str(max(1, min(8, os.cpu_count() or 1)))
    proc = subprocess.run(
        [sys.executable, "-m", "lowra_kernels.compile_check", "--arch", "90", "80", "--jobs", jobs,
         "--cache", str(STATIC), "--verify", "2", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500,
    )
    report = json.loads(out.read_text()) if out.exists() else None
    assert report is not None, proc.stdout[-4000:] + proc.stderr[-4000:]
    s = report["summary"]
    bad = [r for r in report["results"] if not r["ok"] or r["spill_bytes"]]
    assert s["compile_failures"] == 0 and s["spilling_variants"] == 0, json.dumps(bad[:5], indent=1)
    assert s["duplicate_binary_groups"] == 0, report["duplicates"]
    assert s["cache_mismatches"] == 0 and s["cache_verified"] == min(2, s["from_cache"]), report["cache_mismatches"]
    assert proc.returncode == 0, proc.stdout[-4000:]
    kernels = {r["kernel"] for r in report["results"]}
    assert kernels == {"pack", "unpack", "quantize", "dequantize", "lut_gemv", "lut_mm", "gemv_v2", "dequantize_v2"}
    # every shipped config on both targets: as many sm_80 variants as sm_90 ones
    assert sum(r["arch"] == 80 for r in report["results"]) == sum(r["arch"] == 90 for r in report["results"])
    for r in report["results"]:
        assert r["registers"] <= 255 and r["shared_bytes"] <= 227 * 1024
    # every bit-width and activation dtype of every kernel is covered on both targets
    for arch in (80, 90):
        got = {(r["kernel"], r["bits"], r["dtype"]) for r in report["results"] if r["arch"] == arch}
        for name in ("quantize", "dequantize", "lut_gemv", "lut_mm"):
            for bits in (1, 2, 3, 4):
                for dtype in ("float32", "float16", "bfloat16"):
                    assert (name, bits, dtype) in got, (arch, name, bits, dtype)


def test_sass_analysis_counts_loop_body_and_spills():
    from lowra_kernels.compile_check import analyze_sass

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   FFMA R3, R2, R2, R3 ;
        /*0030*/                   STL [R1], R3 ;
        /*0040*/               @P0 BRA `(.L_x_0) ;
        /*0050*/                   EXIT ;
"""
    stats = analyze_sass(sass)
    assert stats["instructions"] == 6
    assert stats["main_loop_instructions"] == 4
    assert stats["spill_instructions"] == 1
    assert stats["main_loop_mix"]["FFMA"] == 1


def test_variant_space_has_no_n_rows_in_autotune_keys():
    """Autotune keys never hold the stored row count (it differs per bit group: re-tuning)."""
    code = (
        "import json\n"
        "from lowra_kernels.compile_check import KERNELS, V2_KERNELS, _kernel\n"
        "print(json.dumps({n: list(_kernel(n).keys) for n in KERNELS if n not in V2_KERNELS}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    keys = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all("n_rows" not in k and "M" not in k for k in keys.values()), keys
    assert "group_size" in keys["lut_mm"] and "GROUP" in keys["lut_gemv"] and "M_BUCKET" in keys["lut_mm"]
