"""``QuantizedTensor``: a weight ``[out, in]`` stored at 1–4 bits per output row.

Layout (see DESIGN.md §4): rows are grouped by bit-width. Each ``BitGroup`` holds the original
indices of its rows, their codes packed along the input dim into int32 words (``kernels.layout``),
and a codebook of ``2**b`` fp16 mapping values per row (or one row shared by all, as NormalFloat
does). One ``GroupScales`` holds the absmax of every ``group_size`` inputs of every row, in the
original row order (fp16, or double-quantized). A weight element is
``codebook[row, code] * absmax[row, col // group_size]``.

``nominal_bits`` counts code bits only (the QLoRA/LoftQ convention); ``effective_bits`` counts
every stored byte (codes, row indices, codebooks, scales) — both are reported everywhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.dequantize import dequantize as dequantize_rows
from kernels.layout import codes_per_word, num_groups, words_per_row
from kernels.quantize import quantize as quantize_rows
from lowra.atomic import atomic_path
from lowra.scales import DQ_BLOCK, GroupScales, compute_absmax
from lowra.validation import check_bits, check_group_size, check_weight

FORMAT_NAME = "lowra.QuantizedTensor"
FORMAT_VERSION = 1


class FormatError(ValueError):
    """A file or state dict that is not a valid LowRA quantized tensor."""


@dataclass
class BitGroup:
    """The rows stored at one bit-width.

    Attributes:
        bits: code width b.
        rows: int32 ``[n]`` original row indices.
        codes: int32 ``[n, words_per_row(in, b)]`` packed codes.
        codebook: fp16 ``[n, 2**b]`` per-row mapping values (sorted), or ``[1, 2**b]`` shared.
    """

    bits: int
    rows: torch.Tensor
    codes: torch.Tensor
    codebook: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"rows": self.rows, "codes": self.codes, "codebook": self.codebook}


def midpoints(codebook: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour thresholds ``[…, 2**b - 1]`` of sorted mapping values ``[…, 2**b]``."""
    cb = codebook.to(torch.float32)
    return (cb[..., 1:] + cb[..., :-1]) * 0.5


class QuantizedTensor:
    """A frozen weight ``[out, in]`` with a bit-width per output row (see module docstring)."""

    def __init__(
        self,
        shape: tuple[int, int],
        group_size: int,
        groups: list[BitGroup],
        scales: GroupScales,
        method: str = "lowra",
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.group_size = int(group_size)
        self.groups = sorted(groups, key=lambda g: g.bits)
        self.scales = scales
        self.method = method
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_codebooks(
        cls,
        weight: torch.Tensor,
        bits_per_row: torch.Tensor | int,
        codebooks: dict[int, torch.Tensor],
        group_size: int = 64,
        double_quant: bool = False,
        method: str = "lowra",
        backend: str = "auto",
    ) -> QuantizedTensor:
        """Quantize ``weight [out, in]`` with given mapping values, nearest-neighbour thresholds.

        Args:
            bits_per_row: int (all rows) or int tensor ``[out]`` with values in {1, 2, 3, 4}.
            codebooks: for each used b, ``[out, 2**b]`` per-row values (indexed by original row)
                or ``[1, 2**b]`` shared; values are in the absmax-normalized space.
        The codebooks are rounded to fp16 (their stored form) before the thresholds are taken, so
        the stored codes are exactly the nearest stored mapping values.
        """
        check_weight(weight)
        group_size = check_group_size(group_size)
        out_features, in_features = weight.shape
        bits_per_row = _as_bits_per_row(bits_per_row, out_features, weight.device)
        scales = GroupScales.store(compute_absmax(weight, group_size), double_quant)
        absmax = scales.restore()
        groups = []
        for b in torch.unique(bits_per_row).tolist():
            b = check_bits(b)
            if b not in codebooks:
                raise ValueError(f"rows use {b} bits but no {b}-bit codebook was given")
            rows = (bits_per_row == b).nonzero().flatten()
            table = codebooks[b].detach()
            if table.dim() != 2 or table.shape[1] != 1 << b or table.shape[0] not in (1, out_features):
                raise ValueError(
                    f"{b}-bit codebook must have shape [{out_features} or 1, {1 << b}], "
                    f"got {tuple(table.shape)}"
                )
            table = table.to(torch.float16).sort(dim=1).values
            if table.shape[0] != 1:
                table = table[rows]
            codes = quantize_rows(weight[rows], absmax[rows], midpoints(table), b, group_size, backend)
            groups.append(BitGroup(b, rows.to(torch.int32), codes, table))
        return cls((out_features, in_features), group_size, groups, scales, method)

    # ------------------------------------------------------------------ properties
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.groups[0].codes.device

    @property
    def bits_per_row(self) -> torch.Tensor:
        """int8 ``[out]``: the bit-width of each row in the original order."""
        bits = torch.zeros(self.out_features, dtype=torch.int8, device=self.device)
        for g in self.groups:
            bits[g.rows.long()] = g.bits
        return bits

    @property
    def nominal_bits(self) -> float:
        """Average code bits per weight (codes only, the QLoRA/LoftQ convention)."""
        code_bits = sum(g.bits * g.rows.numel() for g in self.groups) * self.in_features
        return code_bits / self.numel

    @property
    def nbytes(self) -> int:
        """Every stored byte: codes, row indices, codebooks and scales."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    @property
    def effective_bits(self) -> float:
        """Average stored bits per weight (``nbytes * 8 / numel``)."""
        return self.nbytes * 8 / self.numel

    # ------------------------------------------------------------------ compute
    def dequantize(self, dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
        """The weight ``[out, in]`` in ``dtype``, rows in their original order."""
        from kernels.dispatch import use_cpu

        if use_cpu(backend, self.groups[0].codes):  # C++ CPU backend: one pass, cached tables
            from kernels.cpu_backend import dequantize_weight_cpu

            return dequantize_weight_cpu(self, dtype)
        absmax = self.scales.restore()
        out = torch.full(self.shape, float("nan"), dtype=dtype, device=self.device)
        for g in self.groups:
            dequantize_rows(g.codes, g.rows, g.codebook, absmax, g.bits, self.group_size, out, backend)
        return out

    def to(self, device: torch.device | str) -> QuantizedTensor:
        groups = [
            BitGroup(g.bits, g.rows.to(device), g.codes.to(device), g.codebook.to(device))
            for g in self.groups
        ]
        return QuantizedTensor(self.shape, self.group_size, groups, self.scales.to(device), self.method)

    def __repr__(self) -> str:
        mix = ", ".join(f"{g.bits}b×{g.rows.numel()}" for g in self.groups)
        return (
            f"QuantizedTensor(shape={self.shape}, rows=[{mix}], group_size={self.group_size}, "
            f"nominal_bits={self.nominal_bits:.3f}, effective_bits={self.effective_bits:.3f}, "
            f"method={self.method!r})"
        )

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check internal consistency; raise ``FormatError`` naming the first problem."""
        out_features, in_features = self.shape
        if out_features < 1 or in_features < 1:
            raise FormatError(f"invalid shape {self.shape}")
        if self.group_size < 1:
            raise FormatError(f"invalid group_size {self.group_size}")
        if not self.groups:
            raise FormatError("a quantized tensor needs at least one bit-width group")
        seen = torch.zeros(out_features, dtype=torch.int64)
        for g in self.groups:
            if g.bits not in (1, 2, 3, 4):
                raise FormatError(f"bit-width {g.bits} is not in {{1, 2, 3, 4}}")
            n = g.rows.numel()
            want = (n, words_per_row(in_features, g.bits))
            if g.rows.dim() != 1 or tuple(g.codes.shape) != want or g.codes.dtype != torch.int32:
                raise FormatError(
                    f"{g.bits}-bit group: codes must be int32 {want}, got "
                    f"{g.codes.dtype} {tuple(g.codes.shape)} for {n} rows"
                )
            if g.codebook.dim() != 2 or g.codebook.shape[1] != 1 << g.bits or g.codebook.shape[0] not in (1, n):
                raise FormatError(
                    f"{g.bits}-bit group: codebook must be [{n} or 1, {1 << g.bits}], "
                    f"got {tuple(g.codebook.shape)}"
                )
            if n and (int(g.rows.min()) < 0 or int(g.rows.max()) >= out_features):
                raise FormatError(f"{g.bits}-bit group: row index out of range [0, {out_features})")
            seen.index_add_(0, g.rows.long().cpu(), torch.ones(n, dtype=torch.int64))
        if not bool((seen == 1).all()):
            raise FormatError("every row must be stored in exactly one bit-width group")
        want_scales = (out_features, num_groups(in_features, self.group_size))
        if tuple(self.scales.shape) != want_scales:
            raise FormatError(f"scales have shape {self.scales.shape}, expected {want_scales}")
        if self.scales.double_quant:
            if self.scales.dq_codes.numel() != want_scales[0] * want_scales[1]:
                raise FormatError("double-quantized absmax has the wrong number of codes")
        elif tuple(self.scales.absmax.shape) != want_scales:
            raise FormatError(f"absmax has shape {tuple(self.scales.absmax.shape)}, expected {want_scales}")

    # ------------------------------------------------------------------ serialization
    def metadata(self) -> dict:
        """JSON-able header: everything needed to rebuild the tensor from ``state_dict``."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "shape": list(self.shape),
            "group_size": self.group_size,
            "bits": [g.bits for g in self.groups],
            "double_quant": self.scales.double_quant,
            "dq_block": self.scales.dq_block,
            "method": self.method,
            "codes_per_word": {str(g.bits): codes_per_word(g.bits) for g in self.groups},
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every stored tensor, keyed ``b{bits}.rows|codes|codebook`` and ``absmax…``."""
        tensors = {}
        for g in self.groups:
            for name, t in g.tensors().items():
                tensors[f"b{g.bits}.{name}"] = t
        tensors.update(self.scales.tensors())
        return tensors

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], meta: dict) -> QuantizedTensor:
        """Rebuild from ``state_dict()`` + ``metadata()``; a foreign or broken input raises FormatError."""
        if meta.get("format") != FORMAT_NAME:
            raise FormatError(f"not a LowRA quantized tensor (format={meta.get('format')!r})")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise FormatError(f"unsupported format version {version!r} (this LowRA reads {FORMAT_VERSION})")
        try:
            shape = (int(meta["shape"][0]), int(meta["shape"][1]))
            groups = [
                BitGroup(int(b), tensors[f"b{b}.rows"], tensors[f"b{b}.codes"], tensors[f"b{b}.codebook"])
                for b in meta["bits"]
            ]
            scales = GroupScales.from_tensors(
                tensors, (shape[0], num_groups(shape[1], int(meta["group_size"]))),
                int(meta.get("dq_block", DQ_BLOCK)),
            )
            return cls(shape, int(meta["group_size"]), groups, scales, meta.get("method", "unknown"))
        except KeyError as exc:
            raise FormatError(f"quantized tensor is missing {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file with the JSON header; atomic (a crash leaves the old file)."""
        save_safetensors_atomic(
            {k: v.contiguous() for k, v in self.state_dict().items()},
            path,
            {"lowra": json.dumps(self.metadata())},
        )

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> QuantizedTensor:
        """Read a file written by ``save``; a wrong, truncated or foreign file raises FormatError."""
        tensors, header = load_safetensors_checked(path, device)
        if "lowra" not in header:
            raise FormatError(f"{path} is a safetensors file but not a LowRA quantized tensor")
        return cls.from_state_dict(tensors, json.loads(header["lowra"]))


def _as_bits_per_row(
    bits: torch.Tensor | int, out_features: int, device: torch.device
) -> torch.Tensor:
    if isinstance(bits, torch.Tensor):
        if bits.shape != (out_features,):
            raise ValueError(f"bits per row must have shape [{out_features}], got {tuple(bits.shape)}")
        if bits.is_floating_point() and not bool((bits == bits.round()).all()):
            raise ValueError("bits per row must be integers")
        bits = bits.to(torch.int64)
        bad = ~torch.isin(bits, torch.tensor([1, 2, 3, 4], device=bits.device))
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            raise ValueError(f"bit-width must be one of (1, 2, 3, 4), got {int(bits[first])} (row {first})")
        return bits.to(device)
    return torch.full((out_features,), check_bits(bits), dtype=torch.int64, device=device)


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> None:
    """``safetensors.torch.save_file`` through ``lowra.atomic.atomic_path`` (crash-safe)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_safetensors_checked(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the string header of a safetensors file, with clear errors."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FormatError(f"{path} is not a readable safetensors file (truncated or foreign?): {exc}") from None
    return tensors, header
