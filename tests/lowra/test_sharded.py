"""``ShardedQuantizedWeight``: the FSDP2 op sequence and all-gather extension, in one process.

The multi-process FSDP2 runs (real all-gathers over gloo) are in
``tests/experiments/runner/test_distributed.py``; here each step FSDP2 takes is replayed by hand:
``torch.chunk`` → ``new_zeros`` → ``narrow(...).copy_`` → ``fsdp_pre_all_gather`` → (all-gather =
concatenation of every rank's inputs) → ``fsdp_post_all_gather`` → ``as_strided`` → forward.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowra.format import QuantizedTensor
from lowra.linear import LowRALinear
from lowra.sharded import (
    ShardableLowRALinear,
    ShardedQuantizedWeight,
    make_bases_shardable,
    quantized_resident_bytes,
)


def _mixed(out: int = 37, inn: int = 70, double_quant: bool = False, seed: int = 0) -> QuantizedTensor:
    """A weight with uneven row groups at 1–4 bits and a partial last scale group."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    bits = torch.randint(1, 5, (out,), generator=g)
    books = {b: torch.linspace(-1, 1, 2**b)[None] for b in range(1, 5)}
    return QuantizedTensor.from_codebooks(w, bits, books, group_size=64, double_quant=double_quant, backend="torch")


def _all_gather(pieces: list[ShardedQuantizedWeight]) -> tuple[torch.Tensor, ...]:
    """What FSDP2's all-gather produces: every rank's i-th input, concatenated in rank order."""
    inputs = [p.fsdp_pre_all_gather(_Mesh(len(pieces)), None, None, None, None)[0] for p in pieces]
    return tuple(torch.cat([inp[i] for inp in inputs]) for i in range(len(inputs[0])))


class _Mesh:
    def __init__(self, n: int) -> None:
        self.n = n

    def size(self) -> int:
        return self.n


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_sequence_round_trips_bit_exact(world, double_quant):
    qt = _mixed(double_quant=double_quant)
    w = ShardedQuantizedWeight.from_quantized(qt, world)
    chunks = torch.chunk(w, world, dim=0)
    assert len(chunks) == world
    rows = math.ceil(37 / world)
    pieces = []
    for c in chunks:
        assert isinstance(c, ShardedQuantizedWeight) and c.sharded and tuple(c.shape) == (rows, 70)
        padded = w.new_zeros(c.shape)  # FSDP2: pre-pad, then copy the rank's chunk into it
        padded.narrow(0, 0, c.shape[0]).copy_(c)
        local = padded.narrow(0, 0, c.shape[0])
        assert all(torch.equal(a, b) for a, b in zip(local.inner().values(), c.inner().values(), strict=True))
        assert isinstance(padded.view(-1), ShardedQuantizedWeight)
        pieces.append(local.detach())
    # packed data stays integer in every piece (never a float copy of the codes)
    for key, t in pieces[0].inner().items():
        assert t.dtype == qt.state_dict()[key].dtype and t.dim() == 1
    outputs = _all_gather(pieces)
    whole, to_free = pieces[0].fsdp_post_all_gather(outputs, None, torch.float32)
    assert to_free == ()
    for t, gathered in zip(whole.inner().values(), outputs, strict=True):  # views, not copies
        assert t.untyped_storage().data_ptr() == gathered.untyped_storage().data_ptr()
    param = torch.as_strided(whole, (37, 70), (70, 1), 0)
    back = param.to_quantized(check=True)
    assert torch.equal(back.dequantize(backend="torch"), qt.dequantize(backend="torch"))
    # a later all-gather refills the same buffers: `out` already views them
    assert pieces[0].fsdp_post_all_gather(outputs, None, torch.float32, out=whole) is None


def test_each_rank_stores_a_share():
    qt = _mixed(out=64, inn=128)
    pieces = torch.chunk(ShardedQuantizedWeight.from_quantized(qt, 2), 2, dim=0)
    whole = qt.nbytes
    assert [p.resident_bytes for p in pieces] == [pieces[0].resident_bytes] * 2
    assert whole / 2 <= pieces[0].resident_bytes <= whole / 2 + 64  # ≤ one padded element per tensor


def test_flatten_unflatten_round_trip():
    w = ShardedQuantizedWeight.from_quantized(_mixed(), 2)
    names, ctx = w.__tensor_flatten__()
    back = ShardedQuantizedWeight.__tensor_unflatten__({n: getattr(w, n) for n in names}, ctx, w.shape, w.stride())
    assert back.keys == w.keys and tuple(back.shape) == tuple(w.shape) and back.dtype == w.dtype
    assert torch.equal(back.to_quantized().dequantize(backend="torch"), w.to_quantized().dequantize(backend="torch"))


def test_clear_errors():
    w = ShardedQuantizedWeight.from_quantized(_mixed(), 2)
    with pytest.raises(NotImplementedError, match="does not support"):
        torch.add(w, 1.0)
    with pytest.raises(RuntimeError, match="prepared for 2 ranks"):
        torch.chunk(w, 4, dim=0)
    piece = torch.chunk(w, 2, dim=0)[0]
    with pytest.raises(RuntimeError, match="one rank's piece"):
        piece.to_quantized()
    with pytest.raises(ValueError, match="world size"):
        ShardedQuantizedWeight.from_quantized(_mixed(), 0)


def test_shardable_layer_forward_equals_lowra_linear():
    torch.manual_seed(0)
    layer = LowRALinear(_mixed(out=48, inn=64), rank=4, alpha=8.0)
    nn.init.normal_(layer.lora_B)
    model = nn.Sequential(layer)
    x = torch.randn(3, 64)
    ref = model(x)
    whole_bytes = quantized_resident_bytes(model)
    assert make_bases_shardable(model, world=2) == 1
    assert isinstance(model[0], ShardableLowRALinear) and model[0].is_quantized
    p = model[0].qweight_shards
    assert isinstance(p, nn.Parameter) and not p.requires_grad
    assert torch.equal(model(x), ref)  # whole (no FSDP here): the same result
    assert quantized_resident_bytes(model) == whole_bytes
    with pytest.raises(AttributeError):
        model[0].qweight = None
