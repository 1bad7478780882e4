"""Load a quantized model: ``load_quantized`` reads an HF folder (through ``from_pretrained`` and
``lowra.hf``'s quantizer), re-quantizing nothing; a folder of the removed version-1 manifest layout is
refused with how to convert it (``refuse_version1``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from lowra.checkpoint.common import VERSION1_MANIFEST, _model_class
from lowra.format import FormatError
from lowra.integrity import CHECKSUMS, verify_checksums

__all__ = ["load_merged", "load_peft", "load_quantized"]


def load_quantized(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    verify: bool = True,
) -> nn.Module:
    """Rebuild a model saved by ``save_quantized`` (a Hugging Face folder), re-quantizing nothing.

    Loaded with ``<architecture>.from_pretrained`` (``lowra.hf``'s quantizer: shard headers, tensor
    dtypes/shapes and finite tables are checked) and moved to ``device``, after
    ``lowra_checksums.json`` (every file) and every tensor's sha256 were checked (``verify``).
    Returns the model in eval mode, with only the adapters trainable.
    Raises:
        FormatError (a ValueError): not a LowRA folder, a folder of the removed version-1 layout
            (the message says how to convert it), or a broken or modified checkpoint.
    """
    from lowra.hf import is_lowra_hf_folder, verification, verify_folder

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no such directory: {directory}")
    refuse_version1(directory)
    if verify and (directory / CHECKSUMS).is_file():  # first: a changed config.json is refused naming it
        verify_checksums(directory)
    if not is_lowra_hf_folder(directory):
        config = directory / "config.json"
        what = ("a Hugging Face model folder whose config.json has no quantization_config with "
                "quant_method 'lowra'" if config.is_file() else "no config.json")
        raise FormatError(f"{directory} is not a LowRA checkpoint ({what})")
    cls = _architecture(directory)
    if verify:  # every file and every tensor's bytes, before transformers builds anything
        verify_folder(directory)
    with verification(False):  # checked just above
        loaded = cls.from_pretrained(str(directory))
    loaded.to(device)
    return loaded


#: the last commit whose ``lowra.load_quantized`` reads version-1 folders (the conversion in the message below)
VERSION1_READER = "febd3d3"


def refuse_version1(directory: Path) -> None:
    """A FormatError if ``directory`` holds the version-1 layout (``manifest.json`` of format ``lowra.model``).

    That layout (``save_quantized_legacy``, replaced by the Hugging Face folder) is no longer read:
    the message names it and the conversion (load with a LowRA that reads it, save again).
    """
    path = directory / VERSION1_MANIFEST
    if not path.is_file():
        return
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and manifest.get("format") == "lowra.model":
        raise FormatError(
            f"{directory} is a LowRA checkpoint of the version-1 layout ({VERSION1_MANIFEST} + "
            f"quantized/adapters/rest .safetensors, format_version {manifest.get('format_version')!r}), which this "
            f"LowRA no longer reads: it saves and loads Hugging Face folders (format version 2). To convert it, "
            f"check out LowRA commit {VERSION1_READER} (the last that reads it) and run "
            f"`lowra.save_quantized(lowra.load_quantized({str(directory)!r}), '<new folder>')`; the new folder "
            f"loads here and with AutoModelForCausalLM.from_pretrained after `import lowra` (docs/design.md, "
            f"\"Checkpoints are Hugging Face model folders\")")


def load_merged(directory: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """A folder written by ``merge_to_hf`` (merged, or the dequantized base), its checksums checked first.

    ``lowra_checksums.json`` lists every file with its sha256 (``lowra.integrity``); plain
    ``from_pretrained`` reads the same folder without that check. ``verify=False`` skips it.
    Raises:
        FormatError: no or a broken manifest, a file changed, or not a merged folder.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no such directory: {directory}")
    if verify:
        verify_checksums(directory, kinds=("merged", "dequantized_base"))
    return _architecture(directory).from_pretrained(str(directory)).to(device).eval()


def _architecture(directory: Path) -> type:
    """The transformers class ``config.json``'s ``architectures`` names."""
    names = json.loads((directory / "config.json").read_text()).get("architectures") or []
    if not names:
        raise FormatError(f"{directory}/config.json names no architecture (\"architectures\")")
    return _model_class(names[0])


def load_peft(directory: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """An adapter folder written by ``export_peft_adapters`` on the base its ``adapter_config.json`` names.

    The adapter folder's checksums (its ``base/`` too, with ``include_base=True``) are checked first,
    and a named base folder with its own ``lowra_checksums.json`` is loaded with ``load_merged``;
    then PEFT applies the adapters (``PeftModel.from_pretrained``). Returns the PEFT model in eval mode.
    Raises:
        FormatError: a broken folder; a base that is no dequantized LowRA base is loaded with a warning
            by ``from_pretrained`` (nothing proves it fits).
    """
    from peft import PeftModel

    directory = Path(directory)
    if verify:
        verify_checksums(directory, kinds=("peft_adapter",))
    try:
        base_name = json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{directory}/adapter_config.json names no base_model_name_or_path: {exc!r}") from None
    if (Path(base_name) / CHECKSUMS).is_file():
        base = load_merged(base_name, device, verify)
    else:
        import warnings

        from transformers import AutoModelForCausalLM

        warnings.warn(f"load_peft: {base_name!r} is no dequantized base written by LowRA; nothing proves that the "
                      "adapters fit it", UserWarning, stacklevel=2)
        base = AutoModelForCausalLM.from_pretrained(base_name).to(device)
    return PeftModel.from_pretrained(base, str(directory)).to(device).eval()
