"""Checksums of every file of a folder LowRA writes: ``lowra_checksums.json`` (see docs/design.md,
"Format integrity").

A LowRA checkpoint, a merged model (``merge_to_hf``) and an exported PEFT adapter
(``export_peft_adapters``) each carry ``lowra_checksums.json``::

    {"format": "lowra.checksums", "version": 1, "kind": "lowra" | "merged" | "dequantized_base" | "peft_adapter",
     "files": {"config.json": {"size": 1234, "sha256": "…"},
               "model.safetensors": {"size": 5678, "header_sha256": "…"}, …},
     "fingerprint": "…" (dequantized bases only: ``quantized_fingerprint`` of the model they came from),
     "sha256": "<sha256 of the canonical JSON of everything above>"}

Every file under the folder (sub-folders too, the nested ``adapter/lowra_checksums.json`` included)
is listed with its size and sha256 — except the weight shards of a LowRA checkpoint, listed with the
sha256 of their safetensors *header* (8 length bytes + JSON) only: each tensor's bytes are covered by
its own digest in ``config.json`` (``layout`` and ``dense``), checked as it loads, so the data is
not read twice. ``verify_checksums`` refuses (``FormatError`` naming the file) a listed file that is
missing, has another size or another digest; the manifest's own ``sha256`` is over its parsed
content, so a byte changed in its whitespace is harmless (the content is the same) and any other
change is refused. Files not listed (added later) are not checked: corruption changes bytes, it
does not add files.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from lowra.atomic import write_text_atomic
from lowra.format import FormatError, file_sha256

__all__ = ["CHECKSUMS", "KINDS", "read_checksums", "verify_checksums", "write_checksums"]

CHECKSUMS = "lowra_checksums.json"
FORMAT = "lowra.checksums"
VERSION = 1
KINDS = ("lowra", "merged", "dequantized_base", "peft_adapter")


def _canonical_sha256(body: dict[str, Any]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def header_sha256(path: str | os.PathLike) -> str:
    """sha256 of a safetensors file's header: its 8 length bytes and the JSON they announce."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"{Path(path).name} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > os.path.getsize(path):
            raise FormatError(f"{Path(path).name} is not a readable safetensors file (its header length is beyond "
                              "the end of the file: truncated or corrupted)")
        return hashlib.sha256(raw + f.read(n)).hexdigest()


def _listed_files(directory: Path) -> list[str]:
    """Relative POSIX paths of every file under ``directory`` (hidden names and the manifest excepted)."""
    found = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and not any(p.startswith(".") for p in rel.parts) and rel.as_posix() != CHECKSUMS:
            found.append(rel.as_posix())
    return found


def write_checksums(
    directory: str | os.PathLike, kind: str, header_only: tuple[str, ...] = (), fingerprint: str | None = None
) -> dict[str, Any]:
    """Hash every file under ``directory`` into ``directory/lowra_checksums.json`` (atomic); return it.

    Args:
        kind: what the folder holds (one of ``KINDS``).
        header_only: relative names of safetensors files whose tensors carry their own digests: only
            their header is hashed.
        fingerprint: recorded as is (a dequantized base's ``quantized_fingerprint``).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown checksum kind {kind!r} (one of {KINDS})")
    directory = Path(directory)
    files: dict[str, dict[str, Any]] = {}
    for name in _listed_files(directory):
        path = directory / name
        entry: dict[str, Any] = {"size": path.stat().st_size}
        if name in header_only:
            entry["header_sha256"] = header_sha256(path)
        else:
            entry["sha256"] = file_sha256(path)
        files[name] = entry
    body: dict[str, Any] = {"format": FORMAT, "version": VERSION, "kind": kind, "files": files}
    if fingerprint is not None:
        body["fingerprint"] = fingerprint
    manifest = {**body, "sha256": _canonical_sha256(body)}
    write_text_atomic(directory / CHECKSUMS, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_checksums(directory: str | os.PathLike) -> dict[str, Any]:
    """The validated ``lowra_checksums.json`` of ``directory`` (its own digest checked); FormatError if
    it is absent, unreadable or changed."""
    path = Path(directory) / CHECKSUMS
    if not path.is_file():
        raise FormatError(f"{directory} has no {CHECKSUMS} (written by an older LowRA, or by a plain "
                          "save_pretrained?): nothing proves its files are intact; load it with verify=False "
                          "to accept it unchecked")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path} is not valid JSON (corrupted?): {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), str):
        raise FormatError(f"{path} is not a LowRA checksum manifest (corrupted?)")
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    if _canonical_sha256(body) != manifest["sha256"]:
        raise FormatError(f"{path} fails its own sha256 check (the manifest was corrupted or modified)")
    if body.get("format") != FORMAT or body.get("version") != VERSION:
        raise FormatError(f"{path}: unsupported checksum format {body.get('format')!r} "
                          f"version {body.get('version')!r} (this LowRA reads {FORMAT} {VERSION})")
    if body.get("kind") not in KINDS or not isinstance(body.get("files"), dict):
        raise FormatError(f"{path} lacks a valid 'kind' or 'files'")
    return manifest


def verify_checksums(directory: str | os.PathLike, kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    """Check every file ``lowra_checksums.json`` lists (size, then sha256 or header sha256); return the manifest.

    Raises:
        FormatError: no manifest, a manifest of another ``kind``, or a listed file missing, of
            another size or with another digest (the message names the file).
    """
    directory = Path(directory)
    manifest = read_checksums(directory)
    if manifest["kind"] not in kinds:
        raise FormatError(f"{directory} holds a {manifest['kind']!r} folder, expected {' or '.join(kinds)}")
    for name, entry in manifest["files"].items():
        path = directory / name
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int):
            raise FormatError(f"{CHECKSUMS}: the entry of {name} is malformed")
        if not path.is_file():
            raise FormatError(f"{name} is missing from {directory} (listed in {CHECKSUMS})")
        size = path.stat().st_size
        if size != entry["size"]:
            raise FormatError(f"{name} has {size} bytes, {CHECKSUMS} says {entry['size']} (truncated or modified)")
        if "header_sha256" in entry:
            ok = header_sha256(path) == entry["header_sha256"]
        else:
            ok = file_sha256(path) == entry.get("sha256")
        if not ok:
            raise FormatError(f"{name} in {directory} fails its sha256 check (the file was corrupted or "
                              "modified after it was saved)")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m lowra.integrity DIR…``: check folders before plain transformers / PEFT loads them."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m lowra.integrity", description=main.__doc__)
    p.add_argument("directories", nargs="+")
    args = p.parse_args(argv)
    for d in args.directories:
        try:
            manifest = verify_checksums(d)
        except (FormatError, OSError) as exc:
            print(f"error: {exc}")
            return 1
        print(f"ok: {d} ({manifest['kind']}, {len(manifest['files'])} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
