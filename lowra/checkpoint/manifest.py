"""The legacy (version 1) manifest: ``read_manifest`` validates it and the files it names.

Format name and version, required keys, every data file present with its recorded size and (with
``verify``) its recorded sha256. An HF-layout folder (no manifest) is refused with a message
saying where its options are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lowra.checkpoint.common import MANIFEST, MODEL_FORMAT, MODEL_FORMAT_VERSION
from lowra.format import FormatError, file_sha256

__all__ = ["read_manifest"]


def read_manifest(directory: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The validated manifest of a ``save_quantized`` directory (FormatError if foreign/broken).

    Args:
        verify: also recompute the sha256 of every data file and compare it with the manifest's
            ``file_sha256`` (default); ``False`` checks only presence and sizes.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no such directory: {directory}")
    path = directory / MANIFEST
    if not path.is_file():
        from lowra.hf import is_lowra_hf_folder

        if is_lowra_hf_folder(directory):
            raise FormatError(f"{directory} is a LowRA checkpoint in the Hugging Face layout, which has no "
                              f"{MANIFEST}: its options and layout are in config.json's quantization_config")
        raise FormatError(f"{directory} is not a LowRA checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MODEL_FORMAT:
        raise FormatError(f"{directory} is not a LowRA checkpoint (format={manifest.get('format')!r})"
                          if isinstance(manifest, dict) else f"{path} is not a LowRA manifest")
    if manifest.get("format_version") != MODEL_FORMAT_VERSION:
        raise FormatError(f"unsupported checkpoint format version {manifest.get('format_version')!r} "
                          f"(this LowRA reads {MODEL_FORMAT_VERSION})")
    for key in ("files", "file_sizes", "layers", "model_class"):
        if key not in manifest:
            raise FormatError(f"{path} lacks {key!r}")
    for kind, name in manifest["files"].items():
        f = directory / name
        if not f.is_file():
            raise FormatError(f"checkpoint file {name} is missing from {directory}")
        size, want = f.stat().st_size, manifest["file_sizes"].get(kind)
        if size != want:
            raise FormatError(f"checkpoint file {name} has {size} bytes, expected {want} (truncated or modified)")
    if verify:
        digests = manifest.get("file_sha256")
        if not isinstance(digests, dict):
            raise FormatError(f"{path} carries no checksums (saved by an older LowRA?); "
                              "load it with verify=False to accept it unchecked")
        for kind, name in manifest["files"].items():
            if file_sha256(directory / name) != digests.get(kind):
                raise FormatError(f"checkpoint file {name} fails its sha256 check (corrupted or modified after "
                                  "the save); load_quantized(..., verify=False) skips this check")
    return manifest
