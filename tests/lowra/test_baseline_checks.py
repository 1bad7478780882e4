"""Baselines checked against independent implementations (issue 7).

* QLoRA's NF4: our NormalFloat table equals the published NF4 table exactly (always runs), and on
  real stories260K layers our quantize/dequantize matches bitsandbytes' ``quantize_4bit`` /
  ``dequantize_4bit`` (CPU backend): bnb quantizes blocks of 64 over the FLATTENED tensor, which
  are our per-row groups of 64 whenever ``in % 64 == 0``. The only difference is storage
  precision (we store the table and the absmax in fp16, bnb in fp32), so: the codes agree except
  at exact near-ties, and our dequantized weight is bit-exactly bnb's formula with fp16 table and
  absmax.
* LoftQ: on real layers at 4-bit NF, our ``lowra.adapter_init.loftq_init`` reaches PEFT's
  ``peft.utils.loftq_utils.loftq_init`` residual (compared at alpha == r, since PEFT folds no
  alpha/r scale into the factors).
"""

from __future__ import annotations

import inspect
import os
import textwrap
from pathlib import Path

import pytest
import torch

from lowra.adapter_init import loftq_init
from lowra.format import midpoints
from lowra.normalfloat import normal_float_table
from lowra.quantizers import quantize
from lowra.scales import GroupScales, compute_absmax
from lowra_kernels.unpack import unpack_ref

REPO = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("LOWRA_ASSETS", REPO.parent / "shared" / "assets"))
WEIGHTS = ASSETS / "models" / "stories260K" / "model.safetensors"

# bitsandbytes.functional.get_4bit_type("nf4") — the NF4 table published with QLoRA.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def _bnb():
    """``bitsandbytes.functional``; skip only when bnb is installed but cannot run on this platform."""
    try:
        import bitsandbytes.functional as F
    except ModuleNotFoundError:
        pytest.fail("bitsandbytes is not installed: `pip install -e .[dev]` (it is in the dev extra)")
    except (ImportError, OSError, RuntimeError) as exc:  # native library / backend unavailable here
        pytest.skip(f"bitsandbytes cannot run on this platform: {exc}")
    return F


@pytest.fixture(scope="module")
def real_weights() -> dict[str, torch.Tensor]:
    if not WEIGHTS.is_file():
        pytest.fail(f"real model missing: {WEIGHTS} (set LOWRA_ASSETS)")
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(WEIGHTS).items() if v.dim() == 2}


# ----------------------------------------------------------------------------- NF4 vs bnb
def test_nf4_table_is_the_published_one_exactly() -> None:
    assert torch.equal(normal_float_table(4), torch.tensor(PUBLISHED_NF4, dtype=torch.float32))


def test_nf4_table_equals_bitsandbytes() -> None:
    F = _bnb()
    assert torch.equal(normal_float_table(4), F.get_4bit_type("nf4", device="cpu").float())


def _bnb_codes(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Unpack bnb's uint8 (two 4-bit codes per byte, high nibble first) to int64 ``shape``."""
    b = packed.flatten().to(torch.int64)
    return torch.stack([(b >> 4) & 0xF, b & 0xF], dim=1).flatten()[: shape[0] * shape[1]].view(shape)


def _compare_nf4(F, w: torch.Tensor) -> dict[str, float]:
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    deq_bnb = F.dequantize_4bit(q, state)
    qt = quantize(w, 4, method="nf", group_size=64)
    ours = qt.dequantize()
    codes = unpack_ref(qt.groups[0].codes, 4, w.shape[1]).long()
    codes_bnb = _bnb_codes(q, tuple(w.shape))
    absmax_bnb = state.absmax.float().view(w.shape[0], -1)  # flattened blocks == row groups
    # codes: identical except where x sits within fp16 storage precision of a threshold
    absmax16 = qt.scales.restore()
    x = w / absmax16.repeat_interleave(64, dim=1)
    near_tie = (x[..., None] - midpoints(qt.groups[0].codebook)[0]).abs().amin(-1) < 2e-3
    differ = codes != codes_bnb
    assert not bool((differ & ~near_tie).any()), "a code differs from bnb away from any threshold"
    assert differ.double().mean() < 5e-3  # near-ties: a band of ~1e-3 around 15 thresholds
    # dequantize: bnb's formula with the table and the absmax rounded to our fp16 storage, exactly
    table16 = state.code.half().float()
    expect = table16[codes] * absmax_bnb.half().float().repeat_interleave(64, dim=1)
    assert torch.equal(ours, expect)
    same = ~differ
    diff = (ours - deq_bnb).abs()
    # bound from storage precision only: |t16 − t32|·a + |t|·|a16 − a32| per element
    # (t16·a16 − t·a = (t16 − t)·a16 + t·(a16 − a), |t| ≤ 1), plus fp32 rounding of the products
    bound = ((table16 - state.code).abs().max() * absmax16
             + (absmax16 - absmax_bnb).abs()).repeat_interleave(64, dim=1)
    slack = 2 * torch.finfo(torch.float32).eps * w.abs()
    over = diff - bound - slack
    assert bool((over[same] <= 0).all()), f"|ours − bnb| exceeds the storage bound by {float(over[same].max()):.2e}"

    return {"max_abs_diff": float(diff[same].max()), "rel": float(diff[same].max() / w.abs().max()),
            "code_mismatch": int(differ.sum())}


def test_nf4_quantize_dequantize_matches_bitsandbytes_on_real_layers(real_weights) -> None:
    F = _bnb()
    names = [n for n, w in real_weights.items() if w.shape[1] % 64 == 0]
    assert len(names) == 31  # 5 × (q, k, v, o, gate, up) + the tied embedding
    stats = {n: _compare_nf4(F, real_weights[n]) for n in names}
    worst = max(s["max_abs_diff"] for s in stats.values())
    mismatches = sum(s["code_mismatch"] for s in stats.values())
    print(f"\nNF4 vs bitsandbytes on {len(names)} real matrices: max |ours − bnb| = {worst:.3e}, "
          f"code mismatches {mismatches} of {sum(real_weights[n].numel() for n in names)}")
    assert worst < 2e-3


def test_nf4_matches_bitsandbytes_on_a_large_gaussian() -> None:
    F = _bnb()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 1024, generator=g) * torch.rand(256, 1, generator=g)
    _compare_nf4(F, w)


def test_double_quant_absmax_is_as_accurate_as_bitsandbytes(real_weights) -> None:
    """Same cost (8 bits per absmax + an fp32 scale per 256 + an offset); comparable accuracy."""
    F = _bnb()
    w = real_weights["model.embed_tokens.weight"]
    a = compute_absmax(w, 64).flatten()
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert state.state2.blocksize == 256
    a_bnb = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    a_ours = GroupScales.store(compute_absmax(w, 64), double_quant=True).restore().flatten()
    err_bnb = float(((a_bnb - a).abs() / a).max())
    err_ours = float(((a_ours - a).abs() / a).max())
    print(f"\ndouble-quantized absmax, max relative error: ours {err_ours:.4f}, bnb {err_bnb:.4f}")
    assert err_ours < 0.02 and err_ours <= 2 * err_bnb


# ----------------------------------------------------------------------------- LoftQ vs PEFT
def _peft_loftq():
    """PEFT's own ``loftq_init``. PEFT hard-codes its compute device to CUDA/XPU; on a CPU-only
    machine the same source runs with that one assignment changed to ``"cpu"`` (bnb's CPU backend
    quantizes ``Params4bit`` on ``.to("cpu")``)."""
    _bnb()
    import peft.utils.loftq_utils as mod

    if torch.cuda.is_available():
        return mod.loftq_init
    src = textwrap.dedent(inspect.getsource(mod.loftq_init))
    needle = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    if needle not in src:
        pytest.fail("peft.utils.loftq_utils.loftq_init changed: cannot point its compute device at the CPU")
    namespace = dict(vars(mod))
    exec(compile(src.replace(needle, 'compute_device = "cpu"'), mod.__file__, "exec"), namespace)
    return namespace["loftq_init"]


def _nf4(m: torch.Tensor):
    return quantize(m, 4, method="nf", group_size=64)


LAYERS = ["model.layers.0.mlp.gate_proj.weight", "model.layers.2.self_attn.q_proj.weight",
          "model.embed_tokens.weight"]


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("rank", [2, 8])
def test_loftq_one_iteration_matches_peft(real_weights, name: str, rank: int) -> None:
    """T = 1: both take the best rank-r fit of ``W − deq(Q)``.

    Tolerance: the two NF4 quantizations differ by fp16 storage of table/absmax (≤ 6e-4 per
    element) and by a few near-tie codes (≈ 0.05 % of elements, one NF step each). (1) Exact
    bound: ``R ↦ ‖R − R_r‖`` is 1-Lipschitz in Frobenius norm, so the residuals differ by at most
    ``‖deq_ours − deq_peft‖``. (2) That bound is loose (the tie codes sit in random places, most
    of their difference is not removed by the rank-r fit either way), so we also require the
    residuals to agree within 2 % of PEFT's (observed ≤ 0.7 %); a real algorithmic difference
    (wrong scale, wrong rank, no SVD step) moves it by 10–40 %.
    """
    w = real_weights[name]
    deq_peft, A_p, B_p = _peft_loftq()(w, 4, rank, num_iter=1)
    ours = loftq_init(w, _nf4, rank, alpha=float(rank), iters=1)
    deq = ours.qweight.dequantize()
    res_peft = float((w - deq_peft - B_p @ A_p).norm())
    res_ours = float((w - deq - ours.lora_B @ ours.lora_A).norm())
    bound = float((deq - deq_peft).norm())
    print(f"\n{name} r={rank} T=1: relative residual ours {res_ours / w.norm():.6f}, "
          f"PEFT {res_peft / w.norm():.6f}, Lipschitz bound {bound / w.norm():.2e}")
    assert abs(res_ours - res_peft) <= bound * (1 + 1e-4) + 1e-5 * float(w.norm())
    assert abs(res_ours - res_peft) <= 0.02 * res_peft
    differ = (deq - deq_peft).abs() > 2e-3 * w.abs().max()
    assert differ.double().mean() < 5e-3, "the two NF4 quantizations disagree beyond near-ties"
    assert res_ours < 0.95 * ours.sse_quant ** 0.5


@pytest.mark.parametrize("name", LAYERS)
def test_loftq_five_iterations_reach_peft_residual(real_weights, name: str) -> None:
    """T = 5: the storage-precision perturbation compounds over the alternations (no Lipschitz
    bound), and we return the best iterate where PEFT returns the last. Observed differences are
    ≤ 1.5 %; we require ours ≤ PEFT's × 1.03 and both well below the T = 1 residual."""
    w = real_weights[name]
    rank = 8
    deq_peft, A_p, B_p = _peft_loftq()(w, 4, rank, num_iter=5)
    ours = loftq_init(w, _nf4, rank, alpha=float(rank), iters=5)
    one = loftq_init(w, _nf4, rank, alpha=float(rank), iters=1)
    res_peft = float((w - deq_peft - B_p @ A_p).norm())
    res_ours = ours.sse ** 0.5
    print(f"\n{name} r={rank} T=5: relative residual ours {res_ours / w.norm():.6f}, PEFT {res_peft / w.norm():.6f}")
    assert res_ours <= 1.03 * res_peft
    assert res_ours < 0.97 * one.sse ** 0.5 and res_peft < 0.97 * one.sse ** 0.5


def test_loftq_scale_is_folded_in_where_peft_is_not(real_weights) -> None:
    """alpha ≠ r: ours satisfies W ≈ deq + (alpha/r)·B A; PEFT's factors fit W ≈ deq + B A."""
    w = real_weights["model.layers.0.mlp.gate_proj.weight"]
    _, A_p, B_p = _peft_loftq()(w, 4, 2, num_iter=1)
    ours = loftq_init(w, _nf4, rank=2, alpha=8.0, iters=1)
    fit_peft = B_p @ A_p
    scaled = 4.0 * ours.lora_B @ ours.lora_A  # s = alpha / r = 4
    assert (scaled - fit_peft).norm() < 0.1 * fit_peft.norm()
    assert (ours.lora_B @ ours.lora_A - fit_peft).norm() > 0.5 * fit_peft.norm()
