"""lowra.atomic: files land atomically with the mode a plain ``open`` would give (umask respected)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from experiments.runner.logging_utils import atomic_write_json
from lowra.atomic import atomic_path, current_umask, write_text_atomic
from lowra.quantizers import quantize


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_current_umask_reads_the_process_umask(umask):
    assert current_umask() == umask


def test_atomic_files_respect_the_umask(umask, tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what an ordinary write gives
    write_text_atomic(tmp_path / "a.txt", "hello")
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    quantize(torch.randn(8, 64), 2, method="nf").save(tmp_path / "q.safetensors")
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"\0")
    for name in ("a.txt", "r.json", "q.safetensors", "b.bin"):
        assert _mode(tmp_path / name) == _mode(plain) == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "plain.txt", "q.safetensors", "r.json"]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
