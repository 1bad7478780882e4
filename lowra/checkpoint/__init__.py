"""Save / load a quantized model with its adapters; merge into a plain HF model; PEFT export.

``save_quantized(model, dir)`` writes a standard Hugging Face model folder (format version 2,
``lowra.hf``): ``config.json`` with ``quantization_config`` (``quant_method: "lowra"``), safetensors
shards, tokenizer, and the adapters in PEFT's format in ``dir/adapter/``. After ``import lowra``,
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` returns the quantized model (identical
logits) and ``load_quantized(dir)`` does the same. The save is atomic: the folder is written
under a temporary name beside ``dir`` and renamed into place (an older ``dir`` is removed last).

``load_quantized`` also reads the earlier manifest layout (format version 1), which
``save_quantized_legacy`` still writes (for tools and tests); a folder that is neither fails
with a ``FormatError`` saying so.

Legacy (version 1) directory layout written by ``save_quantized_legacy(model, dir)``::

    dir/manifest.json                    format, version, method, bits, source model, model class,
                                         per-layer shapes/metadata, file names + byte sizes + sha256, report
    dir/config.<token>.json              the HF config (model.config.to_dict())
    dir/quantized.<token>.safetensors    per layer "<name>/b{b}.codes|rows|codebook", "<name>/absmax…"
                                         and the plan "<name>/plan.bits" (int8 [out])
    dir/adapters.<token>.safetensors     "<name>.lora_A" [r, in], "<name>.lora_B" [out, r]
    dir/rest.<token>.safetensors         every other tensor of model.state_dict() (embeddings,
                                         norms, lm_head, biases, dense bases), tied copies once

Atomicity (legacy): a save writes its data files under a fresh token, fsyncs them, and only then replaces
``manifest.json`` (``os.replace``, atomic on POSIX); files of the previous save are deleted after
that. A crash at any moment therefore leaves a directory whose manifest names a complete save —
the previous one or the new one. Loading checks the format name and version, that every file
exists with its recorded size (a truncated file fails clearly) and its recorded sha256
(``file_sha256`` in the manifest: a byte changed anywhere, even at the same size, is refused),
that it parses, that every codebook and scale is finite, and that the shapes match the target
model. ``load_quantized(dir, verify=False)`` (and ``read_manifest(dir, verify=False)``) skips
the hashing — one read of every file — for speed on trusted storage; the other checks still run.
Nothing is re-quantized on load: the codes are read back bit for bit, so
logits after a reload are identical.

``merge_to_hf`` writes ``deq(base) + s·B·A`` as a plain HF model with ``save_pretrained`` (into a
temp dir renamed into place); ``export_peft_adapters`` writes PEFT's LoRA format. The PEFT
adapters apply on top of the *dequantized* base (LoftQ initialized them against it), which
``merge_to_hf(model, dir, include_adapters=False)`` writes.

Modules: :mod:`~lowra.checkpoint.save` (both layouts), :mod:`~lowra.checkpoint.load`,
:mod:`~lowra.checkpoint.manifest` (the legacy manifest's validation),
:mod:`~lowra.checkpoint.export` (merge / PEFT) and :mod:`~lowra.checkpoint.common`.
"""

from lowra.checkpoint.common import ADAPTER_DIR, MANIFEST, MODEL_FORMAT, MODEL_FORMAT_VERSION
from lowra.checkpoint.export import export_peft_adapters, merge_to_hf, quantized_fingerprint
from lowra.checkpoint.load import load_merged, load_peft, load_quantized
from lowra.checkpoint.manifest import read_manifest
from lowra.checkpoint.save import is_checkpoint, save_quantized, save_quantized_legacy

__all__ = [
    "ADAPTER_DIR",
    "MANIFEST",
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "export_peft_adapters",
    "is_checkpoint",
    "load_merged",
    "load_peft",
    "load_quantized",
    "merge_to_hf",
    "quantized_fingerprint",
    "read_manifest",
    "save_quantized",
    "save_quantized_legacy",
]
