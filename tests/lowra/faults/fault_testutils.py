"""Fault injection for saved folders: byte regions (every file; every safetensors header and tensor),
seeded flip positions that hit each region, one flip → one load → refused (naming the place) or
provably harmless."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Region:
    """Bytes ``[begin, end)`` of ``file`` (relative path); ``tensor`` names a safetensors tensor's data."""

    file: str
    begin: int
    end: int
    tensor: str | None = None


@dataclass
class Outcome:
    """What the flips did: ``refused`` / ``harmless`` counts, and every silent load or unnamed refusal."""

    refused: int = 0
    harmless: int = 0
    failures: list[str] = field(default_factory=list)
    regions_hit: set[Region] = field(default_factory=set)


def regions(folder: Path) -> list[Region]:
    """Every file of ``folder``: a safetensors file as its header + one region per tensor, others whole."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        size = path.stat().st_size
        if path.suffix != ".safetensors":
            out.append(Region(rel, 0, size))
            continue
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        out.append(Region(rel, 0, 8 + n))
        header = json.loads(raw[8 : 8 + n])
        for name, entry in header.items():
            if name != "__metadata__" and entry["data_offsets"][1] > entry["data_offsets"][0]:
                b, e = entry["data_offsets"]
                out.append(Region(rel, 8 + n + b, 8 + n + e, name))
    return out


def positions(folder: Path, count: int, seed: int) -> list[tuple[Region, int]]:
    """``count`` seeded ``(region, absolute byte offset)``: one in each region first (in a seeded order,
    so a run with fewer positions than regions still covers every file), the rest uniform over all bytes."""
    rng = random.Random(seed)
    found = regions(folder)
    files = {r.file for r in found}
    first = [r for r in found if r.tensor is None]  # every file (and header) before the tensors
    rest = [r for r in found if r.tensor is not None]
    rng.shuffle(first)
    rng.shuffle(rest)
    picks = (first + rest)[:count]
    total = sum(r.end - r.begin for r in found)
    while len(picks) < count:
        at = rng.randrange(total)
        for r in found:
            if at < r.end - r.begin:
                picks.append(r)
                break
            at -= r.end - r.begin
    assert {r.file for r in picks} == files or count < len(files)
    return [(r, rng.randrange(r.begin, r.end)) for r in picks]


def _parsed(rel: str, raw: bytes) -> object | None:
    """The parsed content of a JSON file or of a safetensors header (``None`` where it does not parse)."""
    try:
        if rel.endswith(".safetensors"):
            (n,) = struct.unpack("<Q", raw[:8])
            return (n, json.loads(raw[8 : 8 + n]), raw[8 + n :])
        if rel.endswith(".json"):
            return json.loads(raw)
    except (ValueError, UnicodeDecodeError, struct.error):
        return None
    return None


def provably_harmless(rel: str, before: bytes, after: bytes) -> bool:
    """The flipped file parses to exactly what it held (e.g. whitespace of a JSON file)."""
    old = _parsed(rel, before)
    return old is not None and _parsed(rel, after) == old


def names(region: Region) -> tuple[str, ...]:
    """Strings of which one must appear in the refusal: the file (name or relative path) or the tensor."""
    return tuple(x for x in (region.file, Path(region.file).name, region.tensor) if x)


def inject(folder: Path, load: Callable[[Path], object], count: int = 200, seed: int = 0,
           names_of: Callable[[Region], tuple[str, ...]] = names) -> Outcome:
    """Flip one byte (XOR a seeded non-zero value) at each of ``positions``, ``load`` the folder, restore.

    A load that raises must name the flipped file or tensor (``names_of``); one that succeeds must
    be ``provably_harmless``; anything else goes to ``Outcome.failures``.
    """
    rng = random.Random(seed + 1)
    outcome = Outcome()
    for region, at in positions(folder, count, seed):
        path = folder / region.file
        before = path.read_bytes()
        after = bytearray(before)
        after[at] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(after))
        outcome.regions_hit.add(region)
        try:
            load(folder)
        except Exception as exc:
            message = str(exc)
            if any(n in message for n in names_of(region)):
                outcome.refused += 1
            else:
                outcome.failures.append(f"{region.file}@{at} ({region.tensor}): refused without naming it: "
                                        f"{type(exc).__name__}: {message[:300]}")
        else:
            if provably_harmless(region.file, before, bytes(after)):
                outcome.harmless += 1
            else:
                outcome.failures.append(f"{region.file}@{at} ({region.tensor}): SILENT LOAD")
        finally:
            path.write_bytes(before)
    return outcome
