"""``experiments.bench.quantize_floor``: the GEMM work counted for each quantize sub-stage."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from experiments.bench.quantize_floor import distinct_inputs, floor, with_init_iters

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
    f = floor(model, targets, calib, candidates=(1, 2, 3, 4), threads=1, rank=2, codebook_iters=2)
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
    assert set(f["factors_s_per_shape"]) == set(f["lloyd_s_per_shape"]) == {f"{o}x{i}" for o, i in shapes}
    init = f["stages"]["quantize + init"]
    one_iter = 2 * sum(o * i * i for o, i in shapes) + sum(i ** 3 // 3 for _, i in shapes)
    assert init["gflop"] == round(2 * one_iter / 1e9, 1)
    factors, per_iter = init["factors_s"], init["per_iter_gemm_s"]
    four = with_init_iters(f, 4)["stages"]["quantize + init"]  # Cholesky once, the rest per iteration
    assert four["factors_s"] == round(4 * factors, 2) and four["gemm_s"] >= round(3 * per_iter, 2)
    assert four["floor_s"] == round(four["gemm_s"] + four["factors_s"], 2)
