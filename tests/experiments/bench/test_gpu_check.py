"""``make gpu-check`` runs in a bare torch + triton image: no cvxpy, hydra, wandb, scipy, transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]

BLOCKED = ("cvxpy", "hydra", "omegaconf", "wandb", "scipy", "transformers", "datasets", "peft", "highspy")
SCRIPT = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
import torch
import experiments.bench.gpu_check, experiments.bench.kernels, lowra_kernels.lut_matmul
from lowra.format import QuantizedTensor
w = torch.randn(8, 40)
q = QuantizedTensor.from_codebooks(w, torch.full((8,), 2), {{2: torch.linspace(-1, 1, 4).expand(8, 4)}}, group_size=32)
y = lowra_kernels.lut_matmul.lut_matmul(torch.randn(3, 40), q.packed())
assert y.shape == (3, 8)
print("ok")
"""


def test_kernels_format_and_gpu_check_import_without_heavy_dependencies():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_gpu_check_without_cuda_writes_json_and_fails(tmp_path):
    from experiments.bench import gpu_check

    if torch.cuda.is_available():
        pytest.skip("with a GPU this would run the whole check; it is `make gpu-check`")
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["environment"]["device"] == "no CUDA device" and report["steps"] == []


def test_gpu_test_files_are_the_files_with_gpu_tests():
    from experiments.bench.gpu_check import gpu_test_files

    files = gpu_test_files()
    assert "tests/kernels/test_kernel_lut_matmul.py" in files and "tests/lowra/test_hf.py" in files
    assert "tests/lowra/precision/test_bounds.py" not in files  # imports cvxpy: must not be collected there
    for f in files:
        assert "pytest.mark.gpu" in (REPO / f).read_text()


def test_bits_per_row_mixes_floor_and_ceil_widths():
    from experiments.bench.decode import bits_per_row

    gen = torch.Generator().manual_seed(0)
    assert torch.equal(bits_per_row(10, 2.0, gen), torch.full((10,), 2))
    mixed = bits_per_row(100, 1.15, gen)
    assert sorted(set(mixed.tolist())) == [1, 2] and int((mixed == 2).sum()) == 15
    assert int((bits_per_row(11, 1.5, gen) == 2).sum()) == 5
    with pytest.raises(ValueError, match="bits must lie in"):
        bits_per_row(10, 4.5, gen)


def test_train_step_bench_cpu_smoke(tmp_path):
    """The GPU training-step bench runs end to end (fp32, CPU, tiny batch): configs, JSON, ratios."""
    from experiments.bench import train_step_gpu as bench_train_step_gpu

    out = tmp_path / "train.json"
    report = bench_train_step_gpu.main(["--cpu-smoke", "--model", "stories260K", "--bits", "1.5", "--batch", "1",
                                        "--seq", "32", "--warmup", "1", "--steps", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["config"] for r in rows] == ["bf16 + PEFT LoRA", "LowRA 1.5b"] == [r["config"] for r in report["results"]]
    assert rows[0]["ratio_to_peft_lora"] == 1.0 and all(r["step_ms"] > 0 for r in rows)
