"""``experiments.bench.quantize_floor``: the GEMM work counted for each quantize sub-stage."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from experiments.bench.quantize_floor import distinct_inputs, floor

ASSETS = Path(os.environ.get("LOWRA_ASSETS") or Path(__file__).resolve().parents[3].parent / "shared" / "assets")


def _stories():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ASSETS / "models" / "stories260K").eval()
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    return model, targets


def test_layers_reading_one_tensor_share_one_gram():
    model, targets = _stories()
    ins = distinct_inputs(model, targets, torch.randint(0, 512, (1, 16)))
    cfg = model.config
    # per block: attention input (q, k, v), o_proj's input, MLP input (gate, up), down_proj's input
    assert len(targets) == 7 * cfg.num_hidden_layers
    assert sorted(ins) == sorted([cfg.hidden_size] * 3 * cfg.num_hidden_layers
                                 + [cfg.intermediate_size] * cfg.num_hidden_layers)


def test_floor_counts_the_calibration_and_table_products():
    model, targets = _stories()
    calib = torch.randint(0, 512, (4, 32))
    f = floor(model, targets, calib, candidates=4, init_iters=1, threads=1)
    cfg = model.config
    shapes = [tuple(model.get_submodule(n).weight.shape) for n in targets]
    p = sum(o * i for o, i in shapes)
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    grams = layers * (3 * d * d + cfg.intermediate_size ** 2)
    attention = layers * 2 * 16 * d * 2
    macs = 128 * (3 * p + 4 * attention + grams + 2 * cfg.vocab_size * d)
    assert f["stages"]["calibrate"]["gflop"] == round(2 * macs / 1e9, 1)
    assert f["stages"]["codebooks + error tables"]["gflop"] == round(2 * 4 * sum(o * i * i for o, i in shapes) / 1e9, 1)
    assert f["gemm_gflops"] > 0 and f["calibration_tokens"] == 128
    assert all(v["floor_s"] >= 0 for v in f["stages"].values())
    assert set(f["svd_s_per_shape"]) == {f"{o}x{i}" for o, i in shapes}
