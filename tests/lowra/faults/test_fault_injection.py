"""Issue 32: one byte flipped at 200 seeded positions across every file and tensor of a saved LowRA
checkpoint, a merged folder and an exported PEFT adapter (with its dequantized base): each load
through the project's loaders is refused naming the file or tensor, or is provably harmless (the
file parses to the same content). Zero silent loads. stories260K; each folder is loaded once per
position in-process."""

from __future__ import annotations

import json
import os

import pytest
import torch
from checkpoint_testutils import logits
from fault_testutils import inject, names, positions, regions

from lowra.checkpoint import export_peft_adapters, load_merged, load_peft, load_quantized, merge_to_hf, save_quantized
from lowra.format import FormatError
from lowra.integrity import CHECKSUMS

COUNT = int(os.environ.get("LOWRA_FAULT_POSITIONS", "200"))
SEED = int(os.environ.get("LOWRA_FAULT_SEED", "0"))


@pytest.fixture(scope="module")
def folders(quantized, tmp_path_factory):
    model, report = quantized
    root = tmp_path_factory.mktemp("faults")
    save_quantized(model, root / "lowra", report=report)
    merge_to_hf(model, root / "merged")
    export_peft_adapters(model, root / "peft", include_base=True)
    return root


def _check(outcome, folder, label):
    every_file = {r.file for r in regions(folder)}
    assert {r.file for r in outcome.regions_hit} == every_file, label
    assert not outcome.failures, f"{label}: {len(outcome.failures)} of {COUNT} flips:\n" + "\n".join(outcome.failures)
    assert outcome.refused + outcome.harmless == COUNT
    print(f"{label}: {COUNT} flips over {len(every_file)} files / {len(regions(folder))} regions "
          f"(seed {SEED}): {outcome.refused} refused naming the place, {outcome.harmless} provably harmless, 0 silent")


def test_lowra_checkpoint(quantized, folders):
    model, _ = quantized
    folder = folders / "lowra"
    expected = logits(model)
    assert torch.equal(logits(load_quantized(folder)), expected)  # the intact folder loads
    outcome = inject(folder, load_quantized, COUNT, SEED)
    _check(outcome, folder, "LowRA checkpoint")
    assert torch.equal(logits(load_quantized(folder)), expected)  # every flip was undone


def test_lowra_checkpoint_through_from_pretrained(folders):
    """transformers' own loading (after ``import lowra``) runs the same checks through the quantizer. A flip in
    ``config.json`` may be refused by transformers before LowRA code runs (invalid JSON, an unknown model
    type, a broken ``quantization_config``, or ``quant_method`` changed: then the guard tensor's size
    mismatch), with transformers' wording: there any refusal counts; everywhere else the error names the
    file or the tensor."""
    from transformers import AutoModelForCausalLM

    folder = folders / "lowra"
    outcome = inject(folder, lambda f: AutoModelForCausalLM.from_pretrained(str(f)), COUNT // 4, SEED + 7,
                     names_of=lambda r: ("",) if r.file == "config.json" else names(r))
    assert not outcome.failures, "\n".join(outcome.failures)


def test_merged_folder(quantized, folders):
    model, _ = quantized
    folder = folders / "merged"
    torch.testing.assert_close(logits(load_merged(folder)), logits(model), rtol=1e-4, atol=1e-4)
    _check(inject(folder, load_merged, COUNT, SEED), folder, "merged folder")


def test_exported_adapter_with_its_base(quantized, folders):
    model, _ = quantized
    folder = folders / "peft"
    torch.testing.assert_close(logits(load_peft(folder)), logits(model), rtol=1e-4, atol=1e-4)
    _check(inject(folder, load_peft, COUNT, SEED), folder, "exported adapter")


def test_whitespace_of_a_manifest_is_harmless_and_anything_else_is_refused(folders):
    folder = folders / "merged"
    path = folder / CHECKSUMS
    before = path.read_bytes()
    try:
        at = before.index(b"\n ")
        path.write_bytes(before[:at + 1] + b"\t" + before[at + 2:])  # a space of the indentation → a tab
        assert json.loads(path.read_bytes()) == json.loads(before)
        load_merged(folder)
        path.write_bytes(before.replace(b'"kind": "merged"', b'"kind": "merget"'))
        with pytest.raises(FormatError, match=f"{CHECKSUMS} fails its own sha256"):
            load_merged(folder)
        path.unlink()
        with pytest.raises(FormatError, match=f"has no {CHECKSUMS}"):
            load_merged(folder)
        load_merged(folder, verify=False)  # accepted unchecked when asked
    finally:
        path.write_bytes(before)


def test_positions_cover_every_file_then_every_tensor(folders):
    folder = folders / "lowra"
    found = regions(folder)
    picked = positions(folder, len(found), SEED)
    assert {r for r, _ in picked} == set(found)
    assert all(r.begin <= at < r.end for r, at in picked)
