"""lowra.integrity: lowra_checksums.json lists every file (sizes, sha256 or a safetensors header's sha256),
its own digest is over its parsed content, and ``python -m lowra.integrity`` reports one line per folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lowra.format import FormatError
from lowra.integrity import CHECKSUMS, main, verify_checksums, write_checksums


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "f"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"a": 1}\n')
    (d / "sub" / "notes.txt").write_text("hello")
    (d / ".hidden").write_text("not listed")
    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(d / "model.safetensors"))
    return d


def test_every_file_is_listed_and_checked(folder):
    manifest = write_checksums(folder, "merged", header_only=("model.safetensors",))
    assert set(manifest["files"]) == {"config.json", "sub/notes.txt", "model.safetensors"}
    assert "header_sha256" in manifest["files"]["model.safetensors"]
    assert verify_checksums(folder)["kind"] == "merged"
    (folder / "sub" / "notes.txt").write_text("hellp")  # same size
    with pytest.raises(FormatError, match="sub/notes.txt in .* fails its sha256 check"):
        verify_checksums(folder)
    (folder / "sub" / "notes.txt").write_text("hell")
    with pytest.raises(FormatError, match="sub/notes.txt has 4 bytes, lowra_checksums.json says 5"):
        verify_checksums(folder)
    (folder / "sub" / "notes.txt").unlink()
    with pytest.raises(FormatError, match="sub/notes.txt is missing"):
        verify_checksums(folder)
    with pytest.raises(FormatError, match="holds a 'merged' folder, expected peft_adapter"):
        verify_checksums(folder, kinds=("peft_adapter",))


def test_header_only_files_check_the_header_not_the_data(folder):
    write_checksums(folder, "lowra", header_only=("model.safetensors",))
    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[-1] ^= 0x01  # tensor data: covered by the tensor's own digest elsewhere, not here
    (folder / "model.safetensors").write_bytes(bytes(raw))
    verify_checksums(folder)
    raw[-1] ^= 0x01
    raw[12] ^= 0x01  # the header
    (folder / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="model.safetensors in .* fails its sha256 check"):
        verify_checksums(folder)


def test_the_manifest_checks_itself(folder):
    write_checksums(folder, "merged")
    path = folder / CHECKSUMS
    text = path.read_text()
    path.write_text(text.replace("\n ", "\n\t", 1))  # whitespace: same content, accepted
    verify_checksums(folder)
    manifest = json.loads(text)
    manifest["files"]["config.json"]["size"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="fails its own sha256 check"):
        verify_checksums(folder)
    path.write_text(text[:-5])
    with pytest.raises(FormatError, match="is not valid JSON"):
        verify_checksums(folder)
    path.unlink()
    with pytest.raises(FormatError, match="has no lowra_checksums.json"):
        verify_checksums(folder)
    with pytest.raises(ValueError, match="unknown checksum kind"):
        write_checksums(folder, "other")


def test_command_line(folder, capsys):
    write_checksums(folder, "merged")
    assert main([str(folder)]) == 0
    assert capsys.readouterr().out.strip() == f"ok: {folder} (merged, 3 files)"
    (folder / "config.json").write_text('{"a": 2}\n')
    assert main([str(folder)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: config.json in ") and "sha256" in out[0]
