"""OPTQ/GPTQ in LowRA's format: exactness of the packed result, agreement with an independent
(non-Cholesky, non-blocked) OBS reference, and the real check of issue 7 — on every target layer
of the real stories260K with real TinyStories activations, OPTQ's output error ‖XWᵀ − XŴᵀ‖ is
below round-to-nearest's at 2, 3 and 4 bits (same grid, same absmax: only the error feedback
differs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lowra.calibration import calibration_windows, collect_hessians
from lowra.quantizers import get_quantizer, quantize
from lowra.quantizers.optq import hessian_from_inputs, optq_quantize, output_error
from lowra.quantizers.uniform import uniform_table
from lowra_kernels.unpack import unpack_ref

REPO = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("LOWRA_ASSETS", REPO.parent / "shared" / "assets"))
MODEL_DIR = ASSETS / "models" / "stories260K"
TEXT = ASSETS / "corpora" / "tinystories_valid.txt"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix


# ----------------------------------------------------------------------------- synthetic checks
def test_budgets_and_calibration_are_checked() -> None:
    q = get_quantizer("optq")
    w = torch.randn(8, 64)
    h = hessian_from_inputs(torch.randn(200, 64))
    with pytest.raises(ValueError, match=r"'optq' supports \(2, 3, 4\)"):
        q.quantize(w, 1, hessian=h)
    with pytest.raises(ValueError, match="needs calibration data"):
        q.quantize(w, 2)
    with pytest.raises(ValueError, match="Hessian must be"):
        q.quantize(w, 2, hessian=h[:32, :32])
    qt = quantize(w, 3, method="optq", inputs=torch.randn(4, 50, 64))
    assert qt.method == "optq" and qt.nominal_bits == 3.0


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("double_quant", [False, True])
def test_diagonal_hessian_is_round_to_nearest(bits: int, double_quant: bool) -> None:
    """No correlation between inputs → no error feedback: OPTQ == the uniform RTN quantizer."""
    torch.manual_seed(bits)
    w = torch.randn(24, 100)  # partial last group (100 = 64 + 36)
    h = torch.diag(torch.rand(100, dtype=torch.float64) + 0.1)
    got = quantize(w, bits, method="optq", hessian=h, double_quant=double_quant).dequantize()
    rtn = quantize(w, bits, method="uniform", double_quant=double_quant).dequantize()
    assert torch.equal(got, rtn)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
def test_packed_result_is_bit_exact(act_order: bool, double_quant: bool) -> None:
    """The codes OPTQ decided are the stored codes, and deq(Q) is exactly the Ŵ of the loop."""
    torch.manual_seed(1)
    w = torch.randn(40, 172)
    h = hessian_from_inputs(_correlated(2000, 172))
    res = optq_quantize(w, 3, h, act_order=act_order, double_quant=double_quant, block_size=32)
    assert torch.equal(res.qweight.dequantize(), res.dequantized)
    g = res.qweight.groups[0]
    assert torch.equal(unpack_ref(g.codes, 3, 172).long(), res.codes)
    assert torch.equal(g.codebook.float(), uniform_table(3).half().float()[None])
    # every Ŵ element is a grid point times the stored (fixed, original-weight) absmax
    absmax = res.qweight.scales.restore().repeat_interleave(64, dim=1)[:, :172]
    assert torch.equal(uniform_table(3).half().float()[res.codes] * absmax, res.dequantized)


def _obs_reference(w: torch.Tensor, h: torch.Tensor, bits: int, damp: float = 0.01) -> torch.Tensor:
    """Textbook OBS/OPTQ in float64, column by column with the explicit inverse-Hessian downdate
    (no Cholesky, no lazy blocks): returns the codes ``[out, in]``."""
    table = uniform_table(bits).half().double()
    thr = (table[1:] + table[:-1]) / 2
    a = w.abs().view(w.shape[0], -1, 64).amax(-1).half().double().repeat_interleave(64, 1)
    W = w.double().clone()
    H = h.double() + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros(w.shape, dtype=torch.int64)
    for j in range(w.shape[1]):
        c = torch.searchsorted(thr, (W[:, j] / a[:, j]).contiguous(), right=False)
        codes[:, j] = c
        err = (W[:, j] - table[c] * a[:, j]) / Hinv[j, j]
        W[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return codes


@pytest.mark.parametrize("bits", [2, 4])
def test_matches_independent_obs_reference(bits: int) -> None:
    """Cholesky form + lazy batch updates == the plain OBS recursion (up to float ties)."""
    torch.manual_seed(2)
    w = torch.randn(32, 128)
    h = hessian_from_inputs(_correlated(3000, 128, seed=3))
    ref = _obs_reference(w, h, bits)
    for block in (1, 16, 128):
        got = optq_quantize(w, bits, h, block_size=block).codes
        agree = (got == ref).double().mean().item()
        assert agree > 0.995, f"block {block}: only {agree:.4f} of the codes agree with the reference"


# ----------------------------------------------------------------------------- real model checks
@pytest.fixture(scope="module")
def real() -> dict:
    if not MODEL_DIR.is_dir() or not TEXT.is_file():
        pytest.fail(f"real assets missing under {ASSETS} (set LOWRA_ASSETS)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    stories = [s for s in TEXT.read_text(encoding="utf-8").split("\n\n") if s.strip()]
    cut = int(len(stories) * 0.9)
    ids = [tok(s, add_special_tokens=False)["input_ids"] for s in stories]
    bos = tok.bos_token_id if tok.bos_token_id is not None else 1
    train = torch.tensor([t for s in ids[:cut] for t in [bos, *s]])
    held = torch.tensor([t for s in ids[cut:] for t in [bos, *s]])
    # a few hundred calibration sequences from the fine-tuning part, held-out windows from the rest
    calib = calibration_windows(train, n_samples=192, seq_len=96, seed=0)
    heldout = calibration_windows(held, n_samples=48, seq_len=96, seed=1)
    h_cal = collect_hessians(model, calib.split(64), TARGETS)
    h_held = collect_hessians(model, heldout.split(48), TARGETS)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in h_cal}
    return {"model": model, "h_cal": h_cal, "h_held": h_held, "weights": weights, "calib": calib}


def test_collect_hessians_is_xtx_over_n(real: dict) -> None:
    model = real["model"]
    name = "model.layers.1.mlp.down_proj"
    layer = model.get_submodule(name)
    seen = []
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().reshape(-1, 172)))
    batch = real["calib"][:8]
    mask = torch.ones_like(batch)
    mask[:, 50:] = 0  # only the first 50 positions of each window count
    try:
        h = collect_hessians(model, [{"input_ids": batch, "attention_mask": mask}], [name])[name]
    finally:
        handle.remove()
    x = seen[0].view(8, 96, 172)[:, :50].reshape(-1, 172).double()
    torch.testing.assert_close(h, x.T @ x / x.shape[0], rtol=1e-10, atol=1e-12)
    assert len(real["h_cal"]) == 5 * 7


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_real_layers_optq_beats_rtn(real: dict, bits: int) -> None:
    """Every stories260K projection: OPTQ's calibration output error < RTN's; held-out in total."""
    rows = []
    for name, w in real["weights"].items():
        h_cal, h_held = real["h_cal"][name], real["h_held"][name]
        rtn = quantize(w, bits, method="uniform").dequantize()
        opt = quantize(w, bits, method="optq", hessian=h_cal).dequantize()
        rows.append((name, output_error(w, rtn, h_cal), output_error(w, opt, h_cal),
                     output_error(w, rtn, h_held), output_error(w, opt, h_held)))
    worse = [(n, oc / rc) for n, rc, oc, _, _ in rows if not oc < rc]
    assert not worse, f"{bits}-bit OPTQ not below RTN on calibration data for {worse}"
    cal_ratio = sum(r[2] for r in rows) / sum(r[1] for r in rows)
    held_ratio = sum(r[4] for r in rows) / sum(r[3] for r in rows)
    print(f"\n{bits}-bit OPTQ/RTN output MSE ratio: calibration {cal_ratio:.3f}, held-out {held_ratio:.3f}")
    assert cal_ratio < 0.9 and held_ratio < 0.95


def test_real_layer_through_quantize_model(real: dict) -> None:
    """The modulora path: OPTQ base inside LowRALinear (standard LoRA init) reproduces Ŵ."""
    import copy

    from lowra.model_layers import lowra_layers
    from lowra.model_quantization import quantize_model

    name = "model.layers.0.self_attn.q_proj"
    model = copy.deepcopy(real["model"])
    h = real["h_cal"][name]
    report = quantize_model(model, 2, method="optq", rank=2, alpha=4, target_modules=name.replace(".", r"\."),
                            loftq_iters=0, hessian=h, progress=False)
    assert report.method == "optq" and report.bits_nominal == 2.0
    (_, layer), = lowra_layers(model)
    expected = optq_quantize(real["weights"][name], 2, h).dequantized
    assert torch.equal(layer.qweight.dequantize(), expected)
