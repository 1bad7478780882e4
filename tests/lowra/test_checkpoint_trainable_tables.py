"""Trained codebooks and scales in the same checkpoint format: save → from_pretrained gives the same
logits (checksums over the new values), merge_to_hf and PEFT export follow the trained tables."""

from __future__ import annotations

import warnings

import pytest
import torch
from checkpoint_testutils import logits, perturb_adapters

from experiments.eval.stories import load_model
from lowra.checkpoint import export_peft_adapters, load_quantized, merge_to_hf, save_quantized
from lowra.config import PAPER
from lowra.model_layers import lowra_layers, train_base_tables
from lowra.model_quantization import quantize_model


@pytest.fixture(scope="module")
def trained():
    """stories260K at 1.5 bits (fp16 scales) with moved adapters and moved trainable codebooks and scales."""
    model = load_model()
    report = quantize_model(model, 1.5, rank=2, alpha=16, double_quant=False, codebook_iters=5, **PAPER,
                            plan_options={"clusters": 16, "samples": 0, "max_nodes": 200}, progress=False)
    before = logits(model)
    perturb_adapters(model)
    new = train_base_tables(model, codebooks=True, scales=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in new.values():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=gen))  # as training would move them
    assert not torch.allclose(logits(model), before, atol=1e-3)
    return model, report


def _tables(model) -> dict[str, torch.Tensor]:
    return {f"{n}/{k}": t.clone() for n, m in lowra_layers(model) for k, t in m.qweight.state_dict().items()}


def test_save_from_pretrained_identical_logits_and_trained_tables(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    model, report = trained
    keys = set(model.state_dict())
    save_quantized(model, tmp_path / "ck", report=report)
    assert set(model.state_dict()) == keys  # no new checkpoint entry: the format gains nothing
    for loaded in (AutoModelForCausalLM.from_pretrained(str(tmp_path / "ck")), load_quantized(tmp_path / "ck")):
        assert torch.equal(logits(loaded), logits(model))
        stored = _tables(loaded)
        for k, t in _tables(model).items():
            assert torch.equal(stored[k], t), k
    name, layer = lowra_layers(model)[0]
    assert torch.equal(layer.qweight.groups[-1].codebook, layer.trainable_codebooks[-1].detach().half())


def test_changed_table_bytes_are_refused(trained, tmp_path):
    """The digests written at save time cover the trained values: a table swapped for the untrained
    one (same size) is refused on load."""
    from safetensors.torch import load_file, save_file

    model, report = trained
    save_quantized(model, tmp_path / "ck", report=report)
    files = sorted((tmp_path / "ck").glob("*.safetensors"))
    for f in files:
        tensors = load_file(str(f))
        key = next((k for k in tensors if k.endswith("codebook")), None)
        if key is not None:
            tensors[key] = tensors[key] * 1.01
            save_file(tensors, str(f), metadata=_metadata(f))
            break
    else:
        pytest.fail("no codebook tensor in the saved folder")
    with pytest.raises(Exception, match="(?i)sha256|digest|checksum|changed|verif"):
        load_quantized(tmp_path / "ck")


def _metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def test_merge_and_peft_export_follow_the_trained_tables(trained, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    model, _ = trained
    merge_to_hf(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    torch.testing.assert_close(logits(merged), logits(model), rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_peft_adapters(model, tmp_path / "peft", include_base=True)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=1e-4, atol=1e-4)
