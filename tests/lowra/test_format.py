"""QuantizedTensor: layout, bit accounting, dequantization, save/load and bad input."""

import math

import pytest
import torch

from lowra import FormatError, QuantizedTensor, quantize
from lowra.scales import GroupScales, compute_absmax
from lowra_kernels.layout import words_per_row


def _mixed_bits(out: int) -> torch.Tensor:
    return torch.tensor([1, 2, 3, 4])[torch.arange(out) % 4]


def _tables():
    return {b: torch.linspace(-1, 1, 2**b)[None] for b in (1, 2, 3, 4)}


@pytest.mark.parametrize("shape", [(37, 172), (64, 64), (5, 1), (3, 333)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_layout_and_accounting(shape, double_quant):
    torch.manual_seed(0)
    w = torch.randn(shape)
    bits = _mixed_bits(shape[0])
    q = QuantizedTensor.from_codebooks(w, bits, _tables(), group_size=64, double_quant=double_quant)
    assert torch.equal(q.bits_per_row.long(), bits)
    for g in q.groups:
        assert g.codes.dtype == torch.int32
        assert g.codes.shape == (g.rows.numel(), words_per_row(shape[1], g.bits))
    assert math.isclose(q.nominal_bits, bits.double().mean().item(), rel_tol=1e-12)
    stored = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert q.nbytes == stored and q.effective_bits == pytest.approx(stored * 8 / w.numel())
    assert q.effective_bits > q.nominal_bits


def test_dequantize_matches_direct_formula():
    torch.manual_seed(1)
    w = torch.randn(24, 172)
    bits = _mixed_bits(24)
    q = QuantizedTensor.from_codebooks(w, bits, _tables(), group_size=64)
    absmax = q.scales.restore()
    deq = q.dequantize()
    assert not torch.isnan(deq).any()
    for r in range(24):
        b = int(bits[r])
        table = torch.linspace(-1, 1, 2**b).half().float()
        scale = absmax[r].repeat_interleave(64)[:172]
        x = w[r] / scale
        nearest = table[(x[:, None] - table[None]).abs().argmin(dim=1)]
        torch.testing.assert_close(deq[r], nearest * scale, rtol=0, atol=1e-6)


def test_partial_group_and_zero_rows():
    w = torch.zeros(4, 172)
    w[1, 170] = 3.0
    q = quantize(w, 2, method="nf")
    deq = q.dequantize()
    assert q.scales.shape == (4, 3)
    assert torch.equal(deq[0], torch.zeros(172))
    assert deq[1, 170].item() == pytest.approx(3.0, rel=1e-3)


def test_double_quant_scales_are_close_and_cheaper():
    torch.manual_seed(2)
    absmax = compute_absmax(torch.randn(512, 4096), 64)
    dq = GroupScales.store(absmax, double_quant=True)
    plain = GroupScales.store(absmax, double_quant=False)
    rel = (dq.restore() - absmax).abs().max() / absmax.max()
    assert rel < 1 / 127
    bytes_dq = sum(t.numel() * t.element_size() for t in dq.tensors().values())
    bytes_fp16 = sum(t.numel() * t.element_size() for t in plain.tensors().values())
    assert bytes_dq * 8 / (512 * 4096) == pytest.approx(0.127, abs=0.002)
    assert bytes_fp16 * 8 / (512 * 4096) == pytest.approx(0.25)


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(3)
    w = torch.randn(40, 172)
    for dq in (False, True):
        q = quantize(w, _mixed_bits(40), method="lowra", double_quant=dq)
        path = tmp_path / f"q{dq}.safetensors"
        q.save(path)
        back = QuantizedTensor.load(path)
        assert back.metadata() == q.metadata()
        assert torch.equal(back.dequantize(), q.dequantize())


def test_load_rejects_truncated_foreign_and_wrong_version(tmp_path):
    from safetensors.torch import save_file

    q = quantize(torch.randn(8, 64), 2, method="nf")
    good = tmp_path / "good.safetensors"
    q.save(good)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-50])
    with pytest.raises(FormatError, match="truncated or foreign"):
        QuantizedTensor.load(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(FormatError, match="not a LowRA"):
        QuantizedTensor.load(foreign)
    meta = q.metadata() | {"format_version": 99}
    with pytest.raises(FormatError, match="version"):
        QuantizedTensor.from_state_dict(q.state_dict(), meta)
    broken = dict(q.state_dict())
    broken["b2.codes"] = broken["b2.codes"][:, :1].contiguous()
    with pytest.raises(FormatError, match="codes"):
        QuantizedTensor.from_state_dict(broken, q.metadata())
    with pytest.raises(FileNotFoundError):
        QuantizedTensor.load(tmp_path / "missing.safetensors")


def test_save_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch as st

    path = tmp_path / "q.safetensors"
    q = quantize(torch.randn(8, 64), 4, method="nf")
    q.save(path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash mid-save")

    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        quantize(torch.randn(8, 64), 2, method="nf").save(path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(
    ("weight", "bits", "group_size", "match"),
    [
        (torch.randn(4, 8), 5, 64, "bit-width"),
        (torch.randn(4, 8), 0, 64, "bit-width"),
        (torch.full((4, 8), float("nan")), 2, 64, "NaN"),
        (torch.tensor([[1.0, float("inf")]]), 2, 64, "NaN/Inf"),
        (torch.randn(8), 2, 64, "2-D"),
        (torch.randn(0, 8), 2, 64, "empty"),
        (torch.randn(4, 8), 2, 0, "group_size"),
        (torch.randn(4, 8), torch.tensor([1, 2, 9, 4]), 64, "bit-width"),
        (torch.randn(4, 8), torch.tensor([1, 2]), 64, "shape"),
        (torch.randn(4, 8), 1.5, 64, "fractional"),
    ],
)
def test_bad_input(weight, bits, group_size, match):
    for method in ("lowra", "nf", "uniform"):
        with pytest.raises(ValueError, match=match):
            quantize(weight, bits, method=method, group_size=group_size)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown quantization method"):
        quantize(torch.randn(4, 8), 2, method="magic")


# ---------------------------------------------------------------------------------- integrity
def _kinds(q):
    return sorted(q.state_dict())


@pytest.mark.parametrize("double_quant", [False, True])
def test_load_refuses_bytes_changed_at_the_same_size(tmp_path, double_quant):
    """Every tensor kind (rows, codes, codebook, absmax or its double-quantized parts): 8 bytes
    flipped in place are refused by ``load`` (sha256), whatever the dequantized values look like."""
    from corrupt_testutils import flip_bytes

    torch.manual_seed(0)
    q = quantize(torch.randn(40, 172), _mixed_bits(40), method="lowra", double_quant=double_quant)
    good = tmp_path / "good.safetensors"
    q.save(good)
    kinds = _kinds(q)
    assert {"b1.codes", "b2.rows", "b4.codebook"} <= set(kinds)
    assert ("absmax.codes" in kinds) == double_quant and ("absmax" in kinds) != double_quant
    for name in kinds:
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(good.read_bytes())
        flip_bytes(bad, name)
        assert bad.stat().st_size == good.stat().st_size
        with pytest.raises(FormatError, match=rf"tensor '{name}' fails its sha256 check"):
            QuantizedTensor.load(bad)
    assert torch.equal(QuantizedTensor.load(good).dequantize(), q.dequantize())


def test_load_without_verify_still_refuses_non_finite_tables(tmp_path):
    from corrupt_testutils import flip_bytes

    q = quantize(torch.randn(16, 64), 2, method="lowra")
    path = tmp_path / "q.safetensors"
    q.save(path)
    fresh = path.read_bytes()
    flip_bytes(path, "b2.codes")  # same size, finite: only the checksum can tell
    assert not torch.equal(QuantizedTensor.load(path, verify=False).dequantize(), q.dequantize())
    for name, match in [("b2.codebook", "codebook"), ("absmax", "absmax")]:
        path.write_bytes(fresh)
        flip_bytes(path, name, count=2, fill=0xFF)  # fp16 0xFFFF is NaN
        with pytest.raises(FormatError, match=match):
            QuantizedTensor.load(path, verify=False)


def test_double_quant_scale_nan_is_refused():
    q = quantize(torch.randn(16, 64), 2, method="nf", double_quant=True)
    state = dict(q.state_dict())
    state["absmax.scale"] = torch.full_like(state["absmax.scale"], float("nan"))
    with pytest.raises(FormatError, match="absmax.scale"):
        QuantizedTensor.from_state_dict(state, q.metadata())


def test_file_without_checksums_needs_verify_false(tmp_path):
    import json as _json

    from lowra.format import save_safetensors_atomic

    q = quantize(torch.randn(8, 64), 2, method="nf")
    path = tmp_path / "old.safetensors"
    save_safetensors_atomic(q.state_dict(), path, {"lowra": _json.dumps(q.metadata())})
    with pytest.raises(FormatError, match="verify=False"):
        QuantizedTensor.load(path)
    assert torch.equal(QuantizedTensor.load(path, verify=False).dequantize(), q.dequantize())


@pytest.mark.parametrize("method", ["lowra", "nf", "uniform"])
def test_fractional_bits_error_points_at_a_plan_not_at_the_same_method(method):
    """``quantize(W, 2.5, method="lowra")`` used to suggest method='lowra' — the method it was given."""
    with pytest.raises(ValueError, match=r"fractional average budget needs a per-row precision plan") as err:
        quantize(torch.randn(4, 64), 2.5, method=method)
    msg = str(err.value)
    assert "lowra.quantize_model(model, 2.5" in msg and "int tensor [out]" in msg
    assert "(method='lowra' or" not in msg


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_dequantized_at_equals_the_stored_round_trip(bits, double_quant):
    """The K-FAC table's values without packing: bit-identical to quantize + pack + dequantize."""
    from lowra.codebook import learn_codebooks
    from lowra.format import dequantized_at

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(40, 200, generator=g) * torch.logspace(-2, 1, 200)
    w[3, :64] = 0.0  # a zero group: x = 0 there
    table = learn_codebooks(w, bits=(bits,), group_size=64, iters=3).codebooks[bits]
    for cb in (table, table[:1]):  # per-row and shared
        ref = QuantizedTensor.from_codebooks(w, bits, {bits: cb}, 64, double_quant).dequantize(torch.float32)
        assert torch.equal(dequantized_at(w, bits, cb, 64, double_quant), ref)
    with pytest.raises(ValueError, match="codebook must have shape"):
        dequantized_at(w, bits, table[:, :1], 64)
