"""Resumable progress of streaming quantization: the partial directory ``<out_dir>.partial/``.

It holds ``progress.json`` (the finished blocks of each pass, written atomically after each block
file) and the block files (safetensors, each written atomically, the block's metadata in the
``lowra_stream`` header entry). A rerun with the same fingerprint (source and options) skips every
finished block; another fingerprint is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lowra.atomic import write_text_atomic
from lowra.format import save_safetensors_atomic

STREAM_FORMAT = "lowra.stream"
STREAM_VERSION = 1
PARTIAL_SUFFIX = ".partial"
PROGRESS = "progress.json"


class PartialDir:
    """``<out_dir>.partial/``: block files + ``progress.json`` (finished blocks per pass)."""

    def __init__(self, path: Path, fingerprint: str, resume: bool) -> None:
        self.path = path
        if path.exists() and not resume:
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        progress_file = path / PROGRESS
        state = None
        if progress_file.is_file():
            try:
                state = json.loads(progress_file.read_text())
            except json.JSONDecodeError:
                state = None  # a torn file cannot exist (atomic writes); treat foreign junk as empty
            if state is not None and (state.get("format") != STREAM_FORMAT or state.get("version") != STREAM_VERSION):
                raise ValueError(f"{path} is not a LowRA streaming partial directory; remove it or pass resume=False")
            if state is not None and state.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{path} holds an interrupted run with another source checkpoint or other options; "
                    "rerun with the same ones to resume, or pass resume=False to start over"
                )
        self.state = state or {"format": STREAM_FORMAT, "version": STREAM_VERSION, "fingerprint": fingerprint,
                               "pass1": [], "plan": False, "pass2": []}
        self._save()

    def _save(self) -> None:
        write_text_atomic(self.path / PROGRESS, json.dumps(self.state, indent=1))

    def mark(self, stage: str) -> None:
        """Record that a whole stage (e.g. ``"calibration"``, whose files it wrote itself) finished."""
        self.state[stage] = True
        self._save()

    def done(self, stage: str, index: int) -> bool:
        return index in self.state[stage] and self.file(stage, index).is_file()

    def file(self, stage: str, index: int | None = None) -> Path:
        return self.path / (f"{stage}.safetensors" if index is None else f"{stage}-{index:05d}.safetensors")

    def write(self, stage: str, index: int | None, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        save_safetensors_atomic({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                self.file(stage, index), {"lowra_stream": json.dumps(meta)})
        if index is None:
            self.state[stage] = True
        elif index not in self.state[stage]:
            self.state[stage].append(index)
        self._save()

    def read(self, stage: str, index: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from lowra.format import load_safetensors_checked

        tensors, header = load_safetensors_checked(self.file(stage, index))
        return tensors, json.loads(header["lowra_stream"])


def read_header(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["lowra_stream"])
