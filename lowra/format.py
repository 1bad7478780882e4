"""``QuantizedTensor``: a weight ``[out, in]`` stored at 1–4 bits per output row.

Layout (see docs/design.md, "The pipeline", row "format"): rows are grouped by bit-width.
Each ``BitGroup`` holds the original indices of its rows, their codes packed along the input dim
into int32 words (``lowra_kernels.layout``),
and a codebook of ``2**b`` fp16 mapping values per row (or one row shared by all, as NormalFloat
does). One ``GroupScales`` holds the absmax of every ``group_size`` inputs of every row, in the
original row order (fp16, or double-quantized). A weight element is
``codebook[row, code] * absmax[row, col // group_size]``.

``nominal_bits`` counts code bits only (the QLoRA/LoftQ convention); ``effective_bits`` counts
every stored byte (codes, row indices, codebooks, scales) — both are reported everywhere.

Integrity: ``save`` stores a sha256 of every tensor's bytes in the file header
(``lowra_sha256``); ``load`` recomputes them by default and refuses a file whose bytes changed,
even at the same size (``verify=False`` skips the hashing, for speed on trusted files). Every
load (``from_state_dict``) also checks that the codebooks and scales are finite, so a corrupted
table cannot silently turn the weights into NaN.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lowra.atomic import atomic_path
from lowra.scales import DQ_BLOCK, GroupScales, compute_absmax
from lowra.validation import check_bits, check_group_size, check_weight
from lowra_kernels.dequantize import dequantize_weight
from lowra_kernels.layout import codes_per_word, num_groups, words_per_row
from lowra_kernels.quantize import quantize as quantize_rows
from lowra_kernels.weight import PackedWeight

FORMAT_NAME = "lowra.QuantizedTensor"
FORMAT_VERSION = 1
#: safetensors header key holding ``{tensor name: sha256 hex of its bytes}``.
DIGEST_KEY = "lowra_sha256"


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


def dequantized_at(weight: torch.Tensor, bits: int, codebook: torch.Tensor, group_size: int = 64,
                   double_quant: bool = False, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """``deq(Q_b(W))`` ``[out, in]`` fp32 with every row of ``weight`` at width ``bits``: bit-identical to
    ``QuantizedTensor.from_codebooks(weight, bits, {bits: codebook}, ...).dequantize(torch.float32)``
    (the same stored absmax, fp16 codebook, thresholds and nearest-code rule, the same fp32 product)
    without packing and unpacking the codes, which cost 3x the rest where only the values are wanted
    (the K-FAC error table of every candidate width).  ``codebook``: ``[out or 1, 2**bits]``;
    ``absmax``: the stored group absmax of these rows restored to fp32 ``[out, groups]`` (computed
    from ``weight`` when None; pass the whole weight's rows when ``weight`` is a slice of rows, since
    double quantization depends on every row).
    """
    from lowra_kernels.quantize import codes_ref, normalize_ref

    check_weight(weight)
    group_size = check_group_size(group_size)
    bits = check_bits(bits)
    out_features, in_features = weight.shape
    if codebook.dim() != 2 or codebook.shape[1] != 1 << bits or codebook.shape[0] not in (1, out_features):
        raise ValueError(f"{bits}-bit codebook must have shape [{out_features} or 1, {1 << bits}], "
                         f"got {tuple(codebook.shape)}")
    if absmax is None:
        absmax = GroupScales.store(compute_absmax(weight, group_size), double_quant).restore()
    table = codebook.detach().to(torch.float16).sort(dim=1).values
    codes = codes_ref(normalize_ref(weight, absmax, group_size), midpoints(table))
    values = table.to(torch.float32).expand(out_features, -1).gather(1, codes)
    return values * absmax.repeat_interleave(group_size, dim=1)[:, :in_features]


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
        return dequantize_weight(self.packed(), dtype, backend)

    def packed(self) -> PackedWeight:
        """The kernels' tensor-only view (``lowra_kernels.weight.PackedWeight``): the stored tensors
        themselves (no copies; empty bit groups dropped), the absmax as stored in fp16, or restored
        to fp32 once when double-quantized (a new tensor per call: callers keep the view)."""
        live = [g for g in self.groups if g.rows.numel() > 0]
        scales = self.scales
        absmax = scales.restore() if scales.double_quant else scales.absmax
        return PackedWeight(tuple(g.codes for g in live), tuple(g.rows for g in live),
                            tuple(g.codebook for g in live), absmax, tuple(g.bits for g in live),
                            self.group_size, self.in_features)

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

    def check_finite(self) -> None:
        """Raise ``FormatError`` if a codebook or scale is NaN/Inf (a corrupted or broken table).

        Run on every load: one non-finite mapping value or absmax would turn whole rows of the
        dequantized weight into NaN/Inf without any other error.
        """
        for g in self.groups:
            if not bool(torch.isfinite(g.codebook).all()):
                raise FormatError(f"{g.bits}-bit codebook (b{g.bits}.codebook) has NaN/Inf values (corrupted?)")
        for name, t in self.scales.tensors().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise FormatError(f"scales {name!r} have NaN/Inf values (corrupted?)")
        if not bool(torch.isfinite(self.scales.restore()).all()):
            raise FormatError("the restored absmax scales have NaN/Inf values (corrupted?)")

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
            qt = cls(shape, int(meta["group_size"]), groups, scales, meta.get("method", "unknown"))
        except KeyError as exc:
            raise FormatError(f"quantized tensor is missing {exc}") from None
        qt.check_finite()
        return qt

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file with the JSON header and per-tensor sha256 digests; atomic."""
        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        digests = {k: tensor_sha256(v) for k, v in tensors.items()}
        save_safetensors_atomic(
            tensors, path, {"lowra": json.dumps(self.metadata()), DIGEST_KEY: json.dumps(digests)}
        )

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True
    ) -> QuantizedTensor:
        """Read a file written by ``save``; a wrong, truncated, foreign or modified file raises FormatError.

        Args:
            verify: recompute every tensor's sha256 and compare it with the header (default). A
                byte changed anywhere, even at the same file size, is refused. ``verify=False``
                skips the hashing (faster on large trusted files); the structure, shape and
                finiteness checks still run.
        """
        tensors, header = load_safetensors_checked(path, device)
        if "lowra" not in header:
            raise FormatError(f"{path} is a safetensors file but not a LowRA quantized tensor")
        if verify:
            if DIGEST_KEY not in header:
                raise FormatError(f"{path} carries no checksums (written by an older LowRA?); "
                                  "load it with verify=False to accept it unchecked")
            verify_tensor_digests(tensors, json.loads(header[DIGEST_KEY]), str(path))
        return cls.from_state_dict(tensors, json.loads(header["lowra"]))


def row_storage_bits(in_features: int, bits: int, group_size: int, double_quant: bool = False) -> int:
    """Stored bits of ONE row of ``in_features`` weights at width ``bits`` (per-row codebook).

    codes (int32 words) + row index (int32) + codebook (``2**bits`` fp16) + its absmax share
    (fp16 per group, or 8-bit codes when double-quantized; the second-level fp32 block scales and
    offset, ~0.125 bit per group, are left out). Summed over the rows of a ``QuantizedTensor``
    with fp16 scales this is exactly ``8 * nbytes``. It is the row's cost in the planner's
    ``budget_kind="effective"`` budget.
    """
    groups = num_groups(in_features, group_size)
    return 32 * words_per_row(in_features, bits) + 32 + 16 * 2**bits + (8 if double_quant else 16) * groups


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


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's raw bytes in C order (dtype and shape are checked separately)."""
    flat = t.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().data).hexdigest()


def verify_tensor_digests(tensors: dict[str, torch.Tensor], digests: dict[str, str], where: str) -> None:
    """Raise ``FormatError`` unless ``tensors`` and ``digests`` have the same names and hashes."""
    if set(tensors) != set(digests):
        raise FormatError(f"{where}: tensors {sorted(set(tensors) ^ set(digests))[:5]} do not match the checksums")
    for name, t in tensors.items():
        if tensor_sha256(t) != digests[name]:
            raise FormatError(f"{where}: tensor {name!r} fails its sha256 check (the file was corrupted or "
                              "modified after it was saved)")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 (hex) of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
