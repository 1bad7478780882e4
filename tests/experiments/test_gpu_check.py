"""``make gpu-check`` runs in a bare torch + triton image: no cvxpy, hydra, wandb, scipy, transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

BLOCKED = ("cvxpy", "hydra", "omegaconf", "wandb", "scipy", "transformers", "datasets", "peft", "highspy")
SCRIPT = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
import torch
import experiments.gpu_check, experiments.bench_kernels, lowra_kernels.lut_matmul
from lowra.format import QuantizedTensor
w = torch.randn(8, 40)
q = QuantizedTensor.from_codebooks(w, torch.full((8,), 2), {{2: torch.linspace(-1, 1, 4).expand(8, 4)}}, group_size=32)
y = lowra_kernels.lut_matmul.lut_matmul(torch.randn(3, 40), q)
assert y.shape == (3, 8)
print("ok")
"""


def test_kernels_format_and_gpu_check_import_without_heavy_dependencies():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_gpu_check_without_cuda_writes_json_and_fails(tmp_path):
    from experiments import gpu_check

    if torch.cuda.is_available():
        pytest.skip("with a GPU this would run the whole check; it is `make gpu-check`")
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["environment"]["device"] == "no CUDA device" and report["steps"] == []
