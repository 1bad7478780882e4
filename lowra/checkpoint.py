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
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowra.atomic import dir_mode, write_text_atomic
from lowra.format import (
    FormatError,
    QuantizedTensor,
    file_sha256,
    load_safetensors_checked,
    save_safetensors_atomic,
)
from lowra.model import lowra_layers
from lowra.nn import LowRALinear

__all__ = [
    "ADAPTER_DIR",
    "MANIFEST",
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "export_peft_adapters",
    "is_checkpoint",
    "load_quantized",
    "merge_to_hf",
    "read_manifest",
    "save_quantized",
    "save_quantized_legacy",
]

MANIFEST = "manifest.json"
ADAPTER_DIR = "adapter"  # PEFT copy of the adapters inside a saved folder (not at its root: see lowra.hf)
REPORT_FILE = "lowra_report.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
MODEL_FORMAT = "lowra.model"
MODEL_FORMAT_VERSION = 1
_DATA_FILE = re.compile(r"^(config|quantized|adapters|rest)\.[0-9a-f]{12}\.(json|safetensors)$")


# ---------------------------------------------------------------------------------- helpers
def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _source_model(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def _dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one copy of tensors that share storage (tied embeddings); return ``aliases``."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for key, t in state.items():
        ident = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            unique[key] = t.detach().contiguous()
    return unique, aliases


def _split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(adapters, rest)`` of ``model.state_dict()``: LoRA factors vs everything else."""
    adapter_keys = set()
    for name, m in lowra_layers(model):
        if m.rank:
            adapter_keys |= {f"{name}.lora_A", f"{name}.lora_B"}
    state = model.state_dict()
    adapters = {k: v for k, v in state.items() if k in adapter_keys}
    rest = {k: v for k, v in state.items() if k not in adapter_keys}
    return adapters, rest


@contextlib.contextmanager
def _params_on_meta():
    """Build modules with parameters on the meta device (no memory), buffers where they belong.

    Non-persistent buffers (e.g. rotary ``inv_freq``) are computed normally, which a plain
    ``torch.device("meta")`` context would lose; parameters are filled later with ``assign=True``.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _config_class(model_type: str):
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise FormatError(f"unknown model_type {model_type!r} in the saved config")
    return CONFIG_MAPPING[model_type]


def _model_class(name: str):
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None or not isinstance(cls, type):
        raise FormatError(f"unknown model class {name!r} in the manifest (transformers has no such class)")
    return cls


def _empty_model(cls, config) -> nn.Module:
    with _params_on_meta():
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    return model


@contextlib.contextmanager
def _atomic_dir(path: str | os.PathLike):
    """Yield a temp dir beside ``path``; on success it replaces ``path`` (old one removed last)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, dir_mode())  # mkdtemp makes 0700; a finished directory gets os.mkdir's mode
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------- save
def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    report: Any | None = None,
    source_model: str | None = None,
    tokenizer: Any | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Save a model quantized by ``quantize_model`` as a Hugging Face model folder (``lowra.hf``).

    Writes ``config.json`` (with ``quantization_config``), ``generation_config.json``, the weights
    (``model.safetensors``, or shards of at most ``max_shard_size`` with
    ``model.safetensors.index.json``, as ``save_pretrained`` does), the tokenizer, the report
    (``lowra_report.json``) and the adapters in PEFT's format (``adapter/``). The model is not modified.

    Args:
        report: a ``QuantizationReport`` (default ``model.lowra_report``): its options go into
            ``quantization_config`` and it is written to ``lowra_report.json``.
        source_model: id or path of the original model (default: the model's ``name_or_path``).
        tokenizer: saved with ``save_pretrained``; ``None`` copies the tokenizer files of a local
            ``source_model`` folder when there are any.
        max_shard_size: bytes (int) or a size string such as ``"5GB"``.
    Returns the directory. Atomic: written under a temporary name beside it, then renamed.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from lowra.hf import LowRAHfConfig, hf_state_dict, layer_layout, quantization_config_dict

    if not lowra_layers(model):
        raise ValueError("the model has no LowRALinear layers; run lowra.quantize_model first")
    if getattr(model, "config", None) is None or not hasattr(model, "save_pretrained"):
        raise ValueError("save_quantized needs a Hugging Face model (a PreTrainedModel with .config)")
    report = report if report is not None else getattr(model, "lowra_report", None)
    previous = getattr(model.config, "quantization_config", None)  # set when loaded from a LowRA folder
    loaded_from = _source_model(model)
    source = source_model or getattr(previous, "source_model", None) or loaded_from
    state = hf_state_dict(model)
    layout = layer_layout(model, state)
    state = remove_tied_weights_from_state_dict(state, model)
    config = copy.deepcopy(model.config)
    config.quantization_config = LowRAHfConfig(
        layout=layout, source_model=source, **quantization_config_dict(model, report)
    )
    config.architectures = [type(model).__name__]
    config.dtype = str(_dense_dtype(model)).removeprefix("torch.")  # what from_pretrained builds the rest in
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    with _atomic_dir(directory) as tmp:
        config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():
            generation.save_pretrained(tmp)
        for filename, names in split.filename_to_tensors.items():
            save_safetensors_atomic({k: state[k] for k in names}, tmp / filename, {"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_parameters": sum(t.numel() for t in state.values()), **split.metadata},
                     "weight_map": split.tensor_to_filename}
            write_text_atomic(tmp / "model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            _copy_tokenizer_files([source, loaded_from], tmp)
        if report is not None:
            write_text_atomic(tmp / REPORT_FILE, json.dumps(report.to_dict(), indent=1))
        if any(m.rank for _, m in lowra_layers(model)):
            _write_peft_adapters(model, tmp / ADAPTER_DIR, source, None)
    return Path(directory)


def _copy_tokenizer_files(candidates: list[str | None], target: Path) -> None:
    """Copy the tokenizer files of the first local folder among ``candidates`` that has any."""
    for folder in candidates:
        if folder is None or not Path(folder).is_dir():
            continue
        found = [Path(folder) / n for n in _TOKENIZER_FILES if (Path(folder) / n).is_file()]
        for f in found:
            shutil.copyfile(f, target / f.name)
        if found:
            return


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """True if ``directory`` holds a complete LowRA save (an HF folder or the legacy manifest layout)."""
    from lowra.hf import is_lowra_hf_folder

    return (Path(directory) / MANIFEST).is_file() or is_lowra_hf_folder(directory)


# ---------------------------------------------------------------------------------- save (legacy)
def save_quantized_legacy(
    model: nn.Module,
    directory: str | os.PathLike,
    report: Any | None = None,
    source_model: str | None = None,
) -> Path:
    """Save in the version-1 manifest layout (see the module docstring); ``save_quantized`` writes HF folders.

    Args:
        report: a ``QuantizationReport`` (default ``model.lowra_report``) stored in the manifest.
        source_model: id or path of the original model (default: the model's ``name_or_path``).
    Returns the directory. Atomic: see the module docstring.
    """
    layers = lowra_layers(model)
    if not layers:
        raise ValueError("the model has no LowRALinear layers; run lowra.quantize_model first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    files = {
        "config": f"config.{token}.json",
        "quantized": f"quantized.{token}.safetensors",
        "adapters": f"adapters.{token}.safetensors",
        "rest": f"rest.{token}.safetensors",
    }
    report = report if report is not None else getattr(model, "lowra_report", None)
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("save_quantized needs a Hugging Face model (with .config)")

    quantized: dict[str, torch.Tensor] = {}
    layer_meta: dict[str, Any] = {}
    for name, m in layers:
        meta = {
            "shape": [m.out_features, m.in_features],
            "base": "quantized" if m.is_quantized else "dense",
            "rank": m.rank,
            "alpha": m.alpha,
            "dropout": float(getattr(m.lora_dropout, "p", 0.0)),
            "bias": m.bias is not None,
        }
        if m.is_quantized:
            qt = m.qweight
            for k, t in qt.state_dict().items():
                quantized[f"{name}/{k}"] = t.contiguous()
            quantized[f"{name}/plan.bits"] = qt.bits_per_row.to(torch.int8)
            meta["quantized"] = qt.metadata()
            meta["nominal_bits"] = qt.nominal_bits
            meta["effective_bits"] = qt.effective_bits
        layer_meta[name] = meta
    adapters, rest = _split_state(model)
    rest, aliases = _dedupe_tied(rest)
    header = {"format": MODEL_FORMAT, "format_version": str(MODEL_FORMAT_VERSION)}

    try:
        write_text_atomic(directory / files["config"], config.to_json_string())
        save_safetensors_atomic(quantized, directory / files["quantized"], header)
        save_safetensors_atomic(adapters, directory / files["adapters"], header)
        save_safetensors_atomic(rest, directory / files["rest"], header)
        for f in files.values():
            _fsync(directory / f)
    except BaseException:
        for f in files.values():
            with contextlib.suppress(FileNotFoundError):
                (directory / f).unlink()
        raise

    import transformers

    manifest = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "method": report.method if report is not None else _method_of(layers),
        "bits": report.bits_target if report is not None else None,
        "bits_nominal": _weighted(layers, "nominal_bits"),
        "bits_effective": _weighted(layers, "effective_bits"),
        "source_model": source_model if source_model is not None else _source_model(model),
        "model_class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "files": files,
        "file_sizes": {k: (directory / f).stat().st_size for k, f in files.items()},
        "file_sha256": {k: file_sha256(directory / f) for k, f in files.items()},
        "layers": layer_meta,
        "tied": aliases,
        "report": report.to_dict() if report is not None else None,
        # the LowRAConfig the model was quantized with (LowRAConfig.to_dict(): an HF quantization_config)
        "lowra_config": _config_dict(model, report),
    }
    write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=1))
    # the new save is committed; drop older data files (ours only, by name pattern)
    keep = set(files.values())
    for f in directory.iterdir():
        if _DATA_FILE.match(f.name) and f.name not in keep:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
    return directory


def _config_dict(model: nn.Module, report: Any | None) -> dict[str, Any] | None:
    from lowra.hf import lowra_config_dict

    return lowra_config_dict(model, report)


def _method_of(layers: list[tuple[str, LowRALinear]]) -> str:
    methods = {m.qweight.method if m.is_quantized else "none" for _, m in layers}
    return methods.pop() if len(methods) == 1 else "mixed"


def _weighted(layers: list[tuple[str, LowRALinear]], attr: str) -> float:
    total = sum(m.in_features * m.out_features for _, m in layers)
    return sum(getattr(m, attr) * m.in_features * m.out_features for _, m in layers) / total


# ---------------------------------------------------------------------------------- load
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


def load_quantized(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    model: nn.Module | None = None,
    verify: bool = True,
) -> nn.Module:
    """Rebuild a model saved by ``save_quantized`` (HF folder) or ``save_quantized_legacy``.

    An HF folder is loaded with ``<architecture>.from_pretrained`` (``lowra.hf``'s quantizer:
    shard headers, tensor dtypes/shapes, sha256 digests and finite tables are checked) and moved
    to ``device``; ``model=`` applies to the legacy layout only. See ``_load_legacy`` for the
    legacy arguments. Returns the model in eval mode, with only the adapters trainable.
    Raises:
        FormatError (a ValueError): neither layout, or a broken or modified checkpoint.
    """
    from lowra.hf import is_lowra_hf_folder, verification

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no such directory: {directory}")
    if (directory / MANIFEST).is_file():
        return _load_legacy(directory, device, model, verify)
    if not is_lowra_hf_folder(directory):
        config = directory / "config.json"
        what = ("a Hugging Face model folder whose config.json has no quantization_config with "
                "quant_method 'lowra'" if config.is_file() else f"neither an HF folder nor a {MANIFEST} layout")
        raise FormatError(f"{directory} is not a LowRA checkpoint ({what})")
    if model is not None:
        raise ValueError("load_quantized(model=...) applies to the legacy manifest layout only; "
                         "an HF-format checkpoint builds its own model")
    config = json.loads((directory / "config.json").read_text())
    names = config.get("architectures") or []
    if not names:
        raise FormatError(f"{directory}/config.json names no architecture (\"architectures\")")
    with verification(verify):
        loaded = _model_class(names[0]).from_pretrained(str(directory))
    loaded.to(device)
    return loaded


def _load_legacy(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    model: nn.Module | None = None,
    verify: bool = True,
) -> nn.Module:
    """Rebuild a model saved by ``save_quantized_legacy``, without re-quantizing anything.

    Args:
        directory: a directory written by ``save_quantized_legacy``.
        device: where to put every tensor.
        model: optional HF model to load into (its target linears must have the saved shapes);
            by default the model is rebuilt from the saved config (parameters are never
            allocated in fp32 for the quantized layers).
        verify: check every file's sha256 against the manifest (default). ``False`` skips the
            hashing (one extra read of every file) for speed on trusted storage; sizes,
            structure, shapes and finite codebooks/scales are checked either way.
    Returns the model in eval mode, with only the adapters trainable.
    Raises:
        FormatError (a ValueError): a foreign directory, a truncated, corrupt or modified file
            (sha256 mismatch), a NaN/Inf codebook or scale, a version this code does not read.
        ValueError: a ``model`` whose shapes differ from the save.
    """
    directory = Path(directory)
    manifest = read_manifest(directory, verify=verify)
    files = manifest["files"]
    quantized, _ = load_safetensors_checked(directory / files["quantized"], device)
    adapters, _ = load_safetensors_checked(directory / files["adapters"], device)
    rest, _ = load_safetensors_checked(directory / files["rest"], device)
    for key, source in manifest.get("tied", {}).items():
        if source not in rest:
            raise FormatError(f"tied tensor {key!r} refers to {source!r}, which is not in the checkpoint")
        rest[key] = rest[source]

    if model is None:
        config_dict = json.loads((directory / files["config"]).read_text())
        config = _config_class(config_dict.get("model_type")).from_dict(config_dict)
        model = _empty_model(_model_class(manifest["model_class"]), config)
    elif lowra_layers(model):
        raise ValueError("load_quantized needs a model with plain nn.Linear layers (this one is quantized)")

    for name, meta in manifest["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint's layer {name!r} does not exist in this model") from None
        if not isinstance(old, nn.Linear):
            raise ValueError(f"the checkpoint's layer {name!r} is a {type(old).__name__} here, not nn.Linear")
        shape = tuple(meta["shape"])
        if (old.out_features, old.in_features) != shape:
            raise ValueError(
                f"layer {name!r} has shape {(old.out_features, old.in_features)} in this model but "
                f"{shape} in the checkpoint (another model size?)"
            )
        bias = rest.pop(f"{name}.bias", None)
        if meta["base"] == "quantized":
            prefix = f"{name}/"
            tensors = {k[len(prefix):]: v for k, v in quantized.items() if k.startswith(prefix)}
            tensors.pop("plan.bits", None)
            try:
                qt = QuantizedTensor.from_state_dict(tensors, meta["quantized"])
            except FormatError as exc:
                raise FormatError(f"layer {name!r}: {exc}") from None
            if qt.shape != shape:
                raise FormatError(f"layer {name!r}: stored codes have shape {qt.shape}, manifest says {shape}")
            base: QuantizedTensor | torch.Tensor = qt
        else:
            key = f"{name}.dense_weight"
            if key not in rest:
                raise FormatError(f"layer {name!r}: dense base {key!r} is missing from the checkpoint")
            base = rest.pop(key)
        lora_A = adapters.pop(f"{name}.lora_A", None)
        lora_B = adapters.pop(f"{name}.lora_B", None)
        if meta["rank"] and (lora_A is None or lora_B is None):
            raise FormatError(f"layer {name!r}: adapters are missing from the checkpoint")
        new = LowRALinear(
            base, bias=bias, rank=meta["rank"], alpha=meta["alpha"], dropout=meta.get("dropout", 0.0),
            adapter_dtype=lora_A.dtype if lora_A is not None else None, lora_A=lora_A, lora_B=lora_B,
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)

    if adapters:
        raise FormatError(f"adapters for unknown layers in the checkpoint: {sorted(adapters)[:5]}")
    expected = {k for k in model.state_dict() if not k.endswith((".lora_A", ".lora_B"))}
    expected -= {f"{n}.bias" for n, m in lowra_layers(model) if m.bias is not None}
    expected -= {f"{n}.dense_weight" for n, m in lowra_layers(model) if not m.is_quantized}
    missing, unexpected = expected - set(rest), set(rest) - expected
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit this model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    for key, value in rest.items():
        current = model.get_parameter(key) if _is_param(model, key) else model.get_buffer(key)
        if tuple(current.shape) != tuple(value.shape):
            raise ValueError(f"tensor {key!r} has shape {tuple(current.shape)} in this model but "
                             f"{tuple(value.shape)} in the checkpoint")
    model.load_state_dict(rest, strict=False, assign=True)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise FormatError(f"the checkpoint does not provide {leftover[:5]}")
    from lowra.model import mark_only_lora_trainable

    model.to(device)
    mark_only_lora_trainable(model)
    model.eval()
    model.lowra_manifest = manifest
    if manifest.get("lowra_config") is not None:  # checkpoints before LowRAConfig have none
        from lowra.config import LowRAConfig

        try:
            model.lowra_config = LowRAConfig.from_dict(manifest["lowra_config"])
        except ValueError as exc:
            raise FormatError(f"{directory}: the manifest's lowra_config is not a valid LowRAConfig: {exc}") from None
    return model


def _is_param(model: nn.Module, key: str) -> bool:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return leaf in module._parameters


# ---------------------------------------------------------------------------------- merge / export
def _plain_state(model: nn.Module, include_adapters: bool, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``state_dict`` of the equivalent plain model: LowRALinear → ``weight`` (+ ``bias``)."""
    state = {}
    layers = dict(lowra_layers(model))
    skip = set()
    for name, m in layers.items():
        skip |= {f"{name}.{k}" for k in ("lora_A", "lora_B", "dense_weight", "bias")}
        w = m.merged_weight(torch.float32) if include_adapters else m.dequantized_weight(torch.float32)
        state[f"{name}.weight"] = w.to(dtype or _dense_dtype(model))
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias.to(dtype or m.bias.dtype)
    for k, v in model.state_dict().items():
        if k not in skip:
            state[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return state


def _dense_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point() and not any(p is q for q in _lora_params(model)):
            return p.dtype
    return torch.float32


def _lora_params(model: nn.Module) -> list[torch.Tensor]:
    from lowra.model import lora_parameters

    return lora_parameters(model)


def merge_to_hf(
    model: nn.Module,
    directory: str | os.PathLike,
    include_adapters: bool = True,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``deq(base) + s·B·A`` (or the dequantized base alone) as a plain HF model.

    The result is written with ``save_pretrained`` and reloads with
    ``AutoModelForCausalLM.from_pretrained`` (or the seq2seq auto class for BART). The quantized
    ``model`` is not modified. Atomic: written into a temp dir that replaces ``directory``.
    """
    if not lowra_layers(model):
        raise ValueError("the model has no LowRALinear layers; nothing to merge")
    config = model.config
    state = _plain_state(model, include_adapters, dtype)
    plain = _empty_model(type(model), config)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    leftover = [n for n, p in plain.named_parameters() if p.device.type == "meta"]
    if leftover or unexpected:
        raise RuntimeError(f"merge failed: missing {leftover[:5]}, unexpected {list(unexpected)[:5]}")
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    with _atomic_dir(directory) as tmp:
        plain.save_pretrained(tmp)
    return Path(directory)


def export_peft_adapters(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write the adapters in PEFT's LoRA format (``adapter_config.json`` + ``adapter_model.safetensors``).

    Keys are ``base_model.model.<layer>.lora_A.weight`` ``[r, in]`` / ``lora_B.weight`` ``[out, r]``.
    Ranks/alphas that differ between layers go to PEFT's ``rank_pattern`` / ``alpha_pattern``.
    The adapters belong on the dequantized base (see ``merge_to_hf(include_adapters=False)``).
    Atomic: written into a temp dir that replaces ``directory``.
    """
    with _atomic_dir(directory) as tmp:
        _write_peft_adapters(model, tmp, base_model_name_or_path, task_type)
    return Path(directory)


def _write_peft_adapters(
    model: nn.Module, directory: Path, base_model_name_or_path: str | None, task_type: str | None
) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory``."""
    layers = [(n, m) for n, m in lowra_layers(model) if m.rank]
    if not layers:
        raise ValueError("the model has no LoRA adapters to export")
    ranks = _most_common([m.rank for _, m in layers])
    alphas = _most_common([m.alpha for _, m in layers])
    dropouts = {float(getattr(m.lora_dropout, "p", 0.0)) for _, m in layers}
    if task_type is None:
        encdec = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        task_type = "SEQ_2_SEQ_LM" if encdec else "CAUSAL_LM"
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or _source_model(model),
        "r": ranks,
        "lora_alpha": alphas,
        "lora_dropout": max(dropouts),
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {n: m.rank for n, m in layers if m.rank != ranks},
        "alpha_pattern": {n: m.alpha for n, m in layers if m.alpha != alphas},
        "use_rslora": False,
        "use_dora": False,
    }
    tensors = {}
    for name, m in layers:
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().contiguous()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(tensors, directory / "adapter_model.safetensors", {"format": "pt"})
    write_text_atomic(directory / "adapter_config.json", json.dumps(config, indent=2))


def _most_common(values: list) -> Any:
    return Counter(values).most_common(1)[0][0]
