"""The pure-PyTorch references: layout, pack/unpack, quantize and dequantize semantics, dispatch."""

import pytest
import torch

from lowra_kernels.dequantize import dequantize, dequantize_ref
from lowra_kernels.dispatch import interpreting, use_triton
from lowra_kernels.layout import codes_per_word, num_groups, words_per_row
from lowra_kernels.pack import pack, pack_ref
from lowra_kernels.quantize import codes_ref, normalize_ref, quantize, quantize_ref
from lowra_kernels.unpack import unpack, unpack_ref


def test_layout_helpers():
    assert [codes_per_word(b) for b in (1, 2, 3, 4)] == [32, 16, 10, 8]
    assert words_per_row(172, 3) == 18 and words_per_row(172, 1) == 6 and words_per_row(64, 4) == 8
    assert num_groups(172, 64) == 3 and num_groups(128, 64) == 2
    with pytest.raises(ValueError):
        codes_per_word(5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("in_features", [1, 31, 172, 256])
def test_pack_unpack_roundtrip(bits, in_features):
    gen = torch.Generator().manual_seed(bits * 1000 + in_features)
    codes = torch.randint(0, 2**bits, (7, in_features), generator=gen)
    words = pack_ref(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (7, words_per_row(in_features, bits))
    assert torch.equal(unpack_ref(words, bits, in_features), codes)


def test_three_bit_layout_ten_per_word():
    codes = torch.arange(20).remainder(8)[None]  # codes 0..7,0,1 | 2..7,0..3
    words = pack_ref(codes, 3)
    assert words.shape == (1, 2)
    expected0 = sum(int(c) << (3 * s) for s, c in enumerate(codes[0, :10].tolist()))
    assert int(words[0, 0]) == expected0 and expected0 < 2**30  # top 2 bits unused
    assert int(words[0, 1]) == sum(int(c) << (3 * s) for s, c in enumerate(codes[0, 10:].tolist()))


def test_one_bit_sign_word_and_padding():
    codes = torch.zeros(2, 40, dtype=torch.int64)
    codes[0, 31] = 1  # top bit of the first word
    codes[1, :32] = 1
    words = pack_ref(codes, 1)
    assert int(words[0, 0]) == -(2**31) and int(words[1, 0]) == -1
    assert int(words[0, 1]) == 0  # codes 32..39 are 0, padding past 40 is 0
    assert torch.equal(unpack_ref(words, 1, 40), codes)


def test_pack_masks_out_of_range_codes():
    assert torch.equal(pack_ref(torch.tensor([[5, 6]]), 2), pack_ref(torch.tensor([[1, 2]]), 2))


def test_normalize_and_codes_semantics():
    w = torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    a = torch.tensor([[2.0, 0.0]])
    x = normalize_ref(w, a, 2)
    assert torch.equal(x, torch.tensor([[0.25, -0.5, 0.0, 0.0]]))  # zero absmax -> 0
    thr = torch.tensor([[-0.5, 0.0, 0.25]])
    # strictly below: x == threshold does not count
    assert codes_ref(x, thr).tolist() == [[2, 0, 1, 1]]


def test_quantize_ref_is_pack_of_codes():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, 100, generator=gen)
    a = w.abs().view(5, -1, 50).amax(-1)
    thr = torch.tensor([[-0.5, 0.0, 0.5]])
    words = quantize_ref(w, a, thr, 2, 50)
    codes = unpack_ref(words, 2, 100)
    x = w / a.repeat_interleave(50, 1)
    assert torch.equal(codes, (x[..., None] > thr[0]).sum(-1))
    with pytest.raises(ValueError):
        quantize_ref(w, a, thr, 3, 50)


def test_dequantize_ref_formula_and_untouched_rows():
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 4, (3, 70), generator=gen)
    words = pack_ref(codes, 2)
    rows = torch.tensor([4, 0, 2], dtype=torch.int32)
    cb = torch.randn(3, 4, generator=gen).half()
    absmax = torch.rand(5, 2, generator=gen)
    out = torch.full((5, 70), float("nan"))
    dequantize_ref(words, rows, cb, absmax, 2, 64, out)
    for i, r in enumerate(rows.tolist()):
        for j in (0, 63, 64, 69):
            want = cb[i, codes[i, j]].float() * absmax[r, j // 64]
            assert out[r, j].item() == want.item()
    assert torch.isnan(out[[1, 3]]).all()


def test_dispatch_rules():
    t = torch.zeros(1)
    assert use_triton("auto", t) is False and use_triton("torch", t) is False
    with pytest.raises(ValueError):
        use_triton("cuda", t)
    if interpreting():
        assert use_triton("triton", t) is True
    # "auto" on CPU runs the references
    codes = torch.randint(0, 4, (3, 20))
    assert torch.equal(pack(codes, 2), pack_ref(codes, 2))
    assert torch.equal(unpack(pack_ref(codes, 2), 2, 20), codes)
    w = torch.randn(3, 20)
    a = w.abs().amax(1, keepdim=True)
    thr = torch.tensor([[-0.5, 0.0, 0.5]])
    assert torch.equal(quantize(w, a, thr, 2, 64), quantize_ref(w, a, thr, 2, 64))
    out = dequantize(pack_ref(codes, 2), torch.arange(3), thr[:, :1].expand(1, 4).contiguous(), a, 2, 64,
                     torch.zeros(3, 20))
    assert torch.isfinite(out).all()


def test_autotune_helper_keeps_one_config_when_interpreting():
    import triton

    from lowra_kernels.autotune import autotune, configs

    space = configs([{"B": 16}, {"B": 32}], num_warps=(2, 4))
    assert len(space) == 4 and space[0].kwargs == {"B": 16} and space[0].num_warps == 2

    @autotune(space, key=["n"])
    @triton.jit
    def _noop(x_ptr, n, B: triton.language.constexpr):
        pass

    assert len(_noop.configs) == (1 if interpreting() else 4)
    with pytest.raises(ValueError):
        autotune([], key=["n"])


def test_gemv_config_pruning_respects_register_budget():
    from lowra_kernels.autotune import configs
    from lowra_kernels.lut_matmul import GEMV_GATHER_TILE_BUDGET, GEMV_TILE_BUDGET, prune_gemv_configs

    space = configs([{"BLOCK_N": 128, "SPLIT_K": 1}, {"BLOCK_N": 32, "SPLIT_K": 2}, {"BLOCK_N": 4, "SPLIT_K": 4}])

    def kept(**kw):
        return [c.kwargs["BLOCK_N"] for c in prune_gemv_configs(space, {}, WORDS=4, PW2=16, **kw)]

    assert kept(BITS=2, BLOCK_M=1) == [32]  # 128 * 64 over budget, 4 * 64 under a quarter of it
    assert kept(BITS=2, BLOCK_M=16) == [4]
    assert GEMV_TILE_BUDGET[4] < GEMV_TILE_BUDGET[2] < GEMV_GATHER_TILE_BUDGET
    assert kept(BITS=4, BLOCK_M=1, ALIGNED=False, GROUP=8) == [32]  # select tree (step spans > 4 groups)
    assert kept(BITS=4, BLOCK_M=1, ALIGNED=True, GROUP=64) == [128, 32]  # gathered: no tree in registers
    assert len(prune_gemv_configs(space[:1], {}, BITS=2, BLOCK_M=16, WORDS=4, PW2=16)) == 1  # never empty


def test_dequantize_config_pruning():
    from lowra_kernels.autotune import configs
    from lowra_kernels.dequantize import DEQUANT_TILE_BUDGET, prune_dequantize_configs

    space = configs([{"BLOCK_R": 16, "STEPS": 1}, {"BLOCK_R": 128, "STEPS": 1}])
    assert [c.kwargs["BLOCK_R"] for c in prune_dequantize_configs(space, {}, WORDS=4, PW2=16)] == [16]
    assert 128 * 64 > DEQUANT_TILE_BUDGET
    assert len(prune_dequantize_configs(space[1:], {}, WORDS=4, PW2=16)) == 1
    # gathered 3/4-bit steps: codes per program within DEQUANT_GATHER_CODES (160 codes per 3-bit step)
    from lowra_kernels.dequantize import DEQUANT_GATHER_CODES

    space = configs([{"BLOCK_R": 16, "STEPS": 1}, {"BLOCK_R": 32, "STEPS": 2}, {"BLOCK_R": 32, "STEPS": 4},
                     {"BLOCK_R": 64, "STEPS": 4}])
    gathered = prune_dequantize_configs(space, {}, BITS=3, WORDS=16, PW2=16, ALIGNED=False, GROUP=64)
    assert [(c.kwargs["BLOCK_R"], c.kwargs["STEPS"]) for c in gathered] == [(16, 1), (32, 2), (32, 4)]
    assert 4 * 160 < DEQUANT_GATHER_CODES[0] <= 16 * 160 and 64 * 4 * 160 > DEQUANT_GATHER_CODES[1]
    selected = prune_dequantize_configs(space, {}, BITS=2, WORDS=4, PW2=16, ALIGNED=True, GROUP=64)
    assert [(c.kwargs["BLOCK_R"], c.kwargs["STEPS"]) for c in selected] == [(16, 1), (32, 2), (32, 4), (64, 4)]


def test_forward_path_on_gpu_follows_the_measured_crossover():
    """A GPU takes the GEMV at M=1 (up to 4 at 3-4 bits) and dequantize + cuBLAS above, never the fused
    GEMM; elsewhere the row-count regimes keep every kernel exercised."""
    from types import SimpleNamespace

    from lowra_kernels.lut_matmul import GEMV_MAX_M, TRAIN_MIN_M, forward_path

    def weight(*widths):
        return SimpleNamespace(bits=widths)

    assert [forward_path(m, weight(2), True) for m in (1, 2, 16, 300)] == ["gemv"] + ["dequant_blas"] * 3
    assert [forward_path(m, weight(3), True) for m in (4, 5)] == ["gemv", "dequant_blas"]
    assert forward_path(2, weight(1, 4), True) == "dequant_blas"  # the narrowest stored width decides
    assert forward_path(GEMV_MAX_M, weight(2), False) == "gemv"
    assert forward_path(GEMV_MAX_M + 1, weight(2), False) == "fused_mm"
    assert forward_path(TRAIN_MIN_M, weight(2), False) == "dequant_blas"
