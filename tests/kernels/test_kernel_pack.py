"""Triton pack / unpack kernels: bit-exact against the references (interpreter on CPU)."""

import pytest
import torch
from kernel_testutils import DEVICE, requires_triton

from lowra_kernels.dispatch import interpreting
from lowra_kernels.pack import pack, pack_ref
from lowra_kernels.unpack import unpack, unpack_ref

pytestmark = requires_triton


def test_interpreter_is_on_without_gpu():
    assert torch.cuda.is_available() or interpreting()


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(37, 172), (1, 1), (70, 256), (3, 33)])
def test_pack_bit_exact(bits, shape):
    gen = torch.Generator().manual_seed(bits + shape[0])
    codes = torch.randint(0, 2**bits, shape, generator=gen).to(DEVICE)
    assert torch.equal(pack(codes, bits, backend="triton"), pack_ref(codes, bits))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int64])
def test_pack_code_dtypes_and_noncontiguous(bits, dtype):
    gen = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 2**bits, (172, 41), generator=gen).to(dtype).to(DEVICE).t()  # strided
    assert torch.equal(pack(codes, bits, backend="triton"), pack_ref(codes, bits))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("in_features", [172, 7, 256])
def test_unpack_bit_exact_and_roundtrip(bits, in_features):
    gen = torch.Generator().manual_seed(bits * 31 + in_features)
    # random words, including negative ones (top bit set) and garbage past in_features
    n_words = -(-in_features // (10 if bits == 3 else 32 // bits))
    words = torch.randint(-(2**31), 2**31 - 1, (45, n_words), generator=gen, dtype=torch.int64)
    words = words.to(torch.int32).to(DEVICE)
    got = unpack(words, bits, in_features, backend="triton")
    assert got.dtype == torch.int64
    assert torch.equal(got, unpack_ref(words, bits, in_features))
    codes = torch.randint(0, 2**bits, (45, in_features), generator=gen).to(DEVICE)
    assert torch.equal(unpack(pack(codes, bits, "triton"), bits, in_features, "triton"), codes)


def test_pack_one_bit_sign_and_empty():
    codes = torch.zeros(2, 64, dtype=torch.int64, device=DEVICE)
    codes[0, 31] = 1
    codes[1] = 1
    words = pack(codes, 1, backend="triton")
    assert words[:, 0].tolist() == [-(2**31), -1] and words[:, 1].tolist() == [0, -1]
    assert pack(codes[:0], 2, backend="triton").shape == (0, 4)
    assert unpack(words[:0], 1, 64, backend="triton").shape == (0, 64)


def test_unpack_rejects_short_rows():
    with pytest.raises(ValueError):
        unpack(torch.zeros(2, 1, dtype=torch.int32, device=DEVICE), 2, 17, backend="triton")
