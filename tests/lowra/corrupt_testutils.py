"""Corrupt one tensor of a safetensors file in place, keeping the file size (tests of checksums)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def tensor_span(path: Path, name: str) -> tuple[int, int]:
    """Absolute byte range ``[begin, end)`` of tensor ``name``'s data in a safetensors file."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    begin, end = header[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def tensor_names(path: Path) -> list[str]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return [k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__"]


def flip_bytes(path: Path, name: str, count: int = 8, fill: int | None = None) -> None:
    """XOR (or overwrite with ``fill``) up to ``count`` bytes at the start of tensor ``name``."""
    begin, end = tensor_span(path, name)
    data = bytearray(Path(path).read_bytes())
    size = len(data)
    for i in range(begin, min(end, begin + count)):
        data[i] = fill if fill is not None else data[i] ^ 0xFF
    assert len(data) == size
    Path(path).write_bytes(bytes(data))
