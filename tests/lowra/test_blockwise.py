"""Block-wise calibration (``lowra.blockwise``): the same statistics as the whole-model passes,
one block's weights and statistics at a time, progress lines per sweep."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from lowra.blockwise import StatStore, block_layout, blockwise_statistics
from lowra.calibration import collect_fisher, collect_hessians
from lowra.methods import CalibrationNeeds
from lowra.weights import ModelSource

ASSETS = Path(os.environ.get("LOWRA_ASSETS") or Path(__file__).resolve().parents[2].parent / "shared" / "assets")
STORIES = ASSETS / "models" / "stories260K"


@pytest.fixture(scope="module")
def model():
    if not STORIES.is_dir():
        pytest.fail(f"real model missing: {STORIES} (set LOWRA_ASSETS)")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 512, (8, 48), generator=torch.Generator().manual_seed(0))


def _names(model) -> list[str]:
    from lowra.model_layers import find_target_linears

    return [n for n, _ in find_target_linears(model, None, ("lm_head",))]


def test_gradient_statistics_equal_the_whole_model_pass(model, windows, tmp_path, caplog):
    """Grams, K-FAC output factors and Fisher diagonals: bit for bit ``collect_fisher``'s."""
    names = _names(model)
    fisher, hess, grads = collect_fisher(model, windows.split(4), names, hessians=True, output_grads=True)
    store = StatStore(tmp_path / "stats")
    needs = CalibrationNeeds(fisher=True, hessians=True, output_grads=True, why="test")
    with caplog.at_level(logging.INFO, logger="lowra"):
        layout = blockwise_statistics(ModelSource(model), names, windows, 4, needs, store, show=True)
    assert [len(t) for t in layout.targets] == [7] * len(layout.layers)
    block = {n: i for i, t in enumerate(layout.targets) for n in t}
    for n in names:
        assert torch.equal(store.get(block[n], f"{n}/hessian"), hess[n]), n
        assert torch.equal(store.get(block[n], f"{n}/output_grad"), grads[n]), n
        assert torch.equal(store.get(block[n], f"{n}/fisher"), fisher[n]), n
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("calibration forward (block by block): 0/") for m in lines)
    assert any(m.startswith("calibration backward (block by block): 10/10 chunks") for m in lines)
    assert not list((tmp_path / "stats").glob("*.bin"))  # the boundaries' spill files are gone


def test_forward_only_statistics_equal_collect_hessians(model, windows, tmp_path):
    names = _names(model)
    ref = collect_hessians(model, windows.split(4), names)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    store = StatStore(tmp_path / "stats")
    layout = blockwise_statistics(ModelSource(model), names, windows, 4, CalibrationNeeds(hessians=True), store,
                                  show=False)
    block = {n: i for i, t in enumerate(layout.targets) for n in t}
    for n in names:
        assert torch.equal(store.get(block[n], f"{n}/hessian"), ref[n]), n
        assert store.get(block[n], f"{n}/output_grad") is None
    assert {n: p.requires_grad for n, p in model.named_parameters()} == saved


def test_a_model_without_decoder_blocks_is_named():
    toy = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="decoder with .layers and .norm.*Sequential"):
        block_layout(toy, ["0"])
