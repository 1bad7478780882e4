"""Fixtures shared by the tests of lowra/: the quantized stories260K model of the checkpoint tests."""

from __future__ import annotations

import pytest
from checkpoint_testutils import perturb_adapters

from experiments.eval.stories import load_model
from lowra.config import PAPER
from lowra.model_quantization import quantize_model


@pytest.fixture(scope="module")
def quantized():
    """stories260K (tied embeddings) at 1.5 bits (the paper preset, double-quantized scales) with
    moved adapters: ``(model, report)``, built once per test module (test_checkpoint.py, test_hf.py)."""
    model = load_model()
    report = quantize_model(model, 1.5, rank=2, alpha=16, double_quant=True, codebook_iters=5, **PAPER,
                            plan_options={"clusters": 16, "samples": 0, "max_nodes": 200}, progress=False)
    perturb_adapters(model)
    return model, report
