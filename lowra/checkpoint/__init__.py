"""Save / load a quantized model with its adapters; merge into a plain HF model; PEFT export.

``save_quantized(model, dir)`` writes a standard Hugging Face model folder (format version 2,
``lowra.hf``): ``config.json`` with ``quantization_config`` (``quant_method: "lowra"``), safetensors
shards, tokenizer, and the adapters in PEFT's format in ``dir/adapter/``. After ``import lowra``,
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` returns the quantized model (identical
logits) and ``load_quantized(dir)`` does the same. The save is atomic: the folder is written
under a temporary name beside ``dir`` and renamed into place (an older ``dir`` is removed last).

Loading checks ``lowra_checksums.json`` and every tensor's sha256 (``verify=False`` skips the hashing
on trusted storage), the shard headers against the layout, and that codebooks and scales are finite;
nothing is re-quantized, so logits after a reload are identical.

The earlier version-1 layout (``manifest.json`` + ``quantized/adapters/rest.<token>.safetensors``,
written by ``save_quantized_legacy``) was removed: ``load_quantized`` refuses such a folder with a
FormatError that names the layout and how to convert it (load it with the last LowRA that reads it,
``save_quantized`` it again); docs/design.md, "Checkpoints are Hugging Face model folders".

``merge_to_hf`` writes ``deq(base) + s·B·A`` as a plain HF model with ``save_pretrained`` (into a
temp dir renamed into place); ``export_peft_adapters`` writes PEFT's LoRA format. The PEFT
adapters apply on top of the *dequantized* base (LoftQ initialized them against it), which
``merge_to_hf(model, dir, include_adapters=False)`` writes (``export_peft_adapters(...,
include_base=True)`` writes it beside the adapters and names it). Every folder written here carries
``lowra_checksums.json`` (:mod:`lowra.integrity`), checked by ``load_quantized``, ``load_merged`` and
``load_peft`` before anything loads (docs/design.md, "Format integrity").

Modules: :mod:`~lowra.checkpoint.save`, :mod:`~lowra.checkpoint.load`, :mod:`~lowra.checkpoint.export`
(merge / PEFT) and :mod:`~lowra.checkpoint.common`.
"""

from lowra.checkpoint.common import ADAPTER_DIR
from lowra.checkpoint.export import export_peft_adapters, merge_to_hf, quantized_fingerprint
from lowra.checkpoint.load import load_merged, load_peft, load_quantized
from lowra.checkpoint.save import is_checkpoint, save_quantized

__all__ = [
    "ADAPTER_DIR",
    "export_peft_adapters",
    "is_checkpoint",
    "load_merged",
    "load_peft",
    "load_quantized",
    "merge_to_hf",
    "quantized_fingerprint",
    "save_quantized",
]
