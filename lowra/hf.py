"""Hugging Face integration: LowRA checkpoints as standard ``from_pretrained`` model folders.

``lowra.save_quantized`` writes a model folder that transformers loads natively once LowRA is
imported (``import lowra`` registers ``quant_method="lowra"`` with transformers'
``register_quantization_config`` / ``register_quantizer``)::

    model = AutoModelForCausalLM.from_pretrained(folder)   # LowRALinear layers, identical logits
    model.save_pretrained(other)                            # round-trips (same codes, same logits)

Folder layout (``lowra.checkpoint`` writes it; ``save_pretrained`` writes the same files but the
report, tokenizer and PEFT copy)::

    config.json                        the model config + "quantization_config":
                                       {"quant_method": "lowra", "format_version": 2,
                                        <the quantization options (quantization_config_dict)>,
                                        "source_model": ..., "layout": {<layer>: LayerSpec}}
    model.safetensors                  (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    generation_config.json, tokenizer files, lowra_report.json
    adapter/adapter_config.json        the adapters in PEFT's LoRA format (see export_peft_adapters)
    adapter/adapter_model.safetensors

Tensor names: every tensor of ``model.state_dict()`` under its usual name (embeddings, norms,
``lm_head``, and each LowRA layer's ``bias`` / ``dense_weight`` / ``lora_A [r, in]`` /
``lora_B [out, r]``), plus each quantized layer's ``QuantizedTensor`` tensors under
``<layer>.<key with "." → "_">``: ``b{b}_rows`` int32 ``[n]``, ``b{b}_codes`` int32
``[n, words]``, ``b{b}_codebook`` fp16 ``[n or 1, 2**b]``, and ``absmax`` fp16 ``[out, groups]``
(or ``absmax_codes|scale|offset`` when double-quantized). Tied copies are stored once.

``layout`` (a ``LayerSpec`` per LowRA layer) holds what rebuilding needs without reading data:
``shape [out, in]``, ``rank``, ``alpha``, ``dropout``, ``quantized`` (``QuantizedTensor.metadata()``
or ``None`` for a dense base) and ``tensors`` ``{suffix: {"dtype", "shape", "sha256"}}``.

Why adapters are in ``model.safetensors`` too: PEFT cannot wrap a ``LowRALinear``, and a folder
with ``adapter_config.json`` at its root makes ``from_pretrained`` apply PEFT to the loaded model;
so the model weights carry the adapters (the saved model's logits come back) and the PEFT copy
sits in ``adapter/``, for use on the dequantized base (``merge_to_hf(include_adapters=False)``).

Loading is strict and safe: safetensors only; before any data is read every shard's header is
parsed and its size checked (a truncated file fails, naming it), every LowRA tensor must exist
with the dtype and shape of ``layout`` and no model tensor may be missing (errors name the
tensor); after loading, each LowRA tensor's sha256 is checked against ``layout``, before loading every other stored
tensor's bytes against ``dense`` (embeddings, norms, ``lm_head``), and codebooks
and scales must be finite; before all of it, ``lowra_checksums.json`` (``lowra.integrity``) is
checked: every other file of the folder (``config.json`` included) and each shard's header. Any of
these raises ``lowra.FormatError`` (a ``ValueError``) naming the tensor or the file. A loaded
model's ``save_pretrained`` writes ``lowra_checksums.json`` too.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import json
import os
import re
import struct
import types
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowra.format import FormatError, QuantizedTensor, tensor_sha256
from lowra.linear import LowRALinear
from lowra.model_layers import lowra_layers, mark_only_lora_trainable, saved_linear

__all__ = [
    "HF_FORMAT_VERSION",
    "QUANT_METHOD",
    "LowRAHfConfig",
    "LowRAHfQuantizer",
    "hf_state_dict",
    "is_lowra_hf_folder",
    "layer_layout",
    "quantization_config_dict",
    "register",
    "verification",
]

QUANT_METHOD = "lowra"
HF_FORMAT_VERSION = 2  # version 1 is lowra.checkpoint's manifest layout
_RESERVED = ("quant_method", "format_version", "source_model", "layout", "dense")
_ADAPTER_KEYS = ("lora_A", "lora_B")
_DENSE_KEYS = ("dense_weight", "bias")
_QT_SUFFIX = re.compile(r"^(b[1-4]_(rows|codes|codebook)|absmax(_codes|_scale|_offset)?)$")
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_VERIFY: contextvars.ContextVar[bool] = contextvars.ContextVar("lowra_hf_verify", default=True)


# ---------------------------------------------------------------------------------- what is saved
def _most_common(values: list) -> Any:
    return Counter(values).most_common(1)[0][0] if values else None


def lowra_config_dict(model: nn.Module, report: Any | None) -> dict[str, Any] | None:
    """``LowRAConfig.to_dict()`` of ``model.lowra_config`` (else the report's), None if unknown."""
    config = getattr(model, "lowra_config", None)
    if config is not None:
        return config.to_dict()
    return getattr(report, "config", None)


def quantization_config_dict(model: nn.Module, report: Any | None = None) -> dict[str, Any]:
    """The quantization options of a quantized ``model`` as a JSON-able dict.

    This is the one place the options in ``config.json``'s ``quantization_config`` come from
    (``quant_method``, ``format_version``, ``source_model`` and ``layout`` are added around it).
    With a ``QuantizationReport`` the options are the report's; without one, those of a model
    loaded from a LowRA folder are kept, else they are read off the layers.
    """
    layers = lowra_layers(model)
    if not layers:
        raise ValueError("the model has no LowRALinear layers; run lowra.quantize_model first")
    quantized = [m.qweight for _, m in layers if m.is_quantized]
    methods = {q.method for q in quantized} or {"none"}
    derived: dict[str, Any] = {
        "method": methods.pop() if len(methods) == 1 else "mixed",
        "bits": None,
        "rank": _most_common([m.rank for _, m in layers]),
        "alpha": _most_common([m.alpha for _, m in layers]),
        "dropout": _most_common([float(getattr(m.lora_dropout, "p", 0.0)) for _, m in layers]),
        "group_size": _most_common([q.group_size for q in quantized]),
        "double_quant": _most_common([q.scales.double_quant for q in quantized]),
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in layers}),
    }
    if report is not None:
        derived.update(
            method=report.method, bits=report.bits_target, rank=report.rank, alpha=report.alpha,
            group_size=report.group_size, double_quant=report.double_quant, loftq_iters=report.loftq_iters,
            candidates=list(report.candidates), init=report.init, budget_kind=report.budget_kind,
            error=report.error_table,
        )
    else:
        previous = getattr(getattr(model, "config", None), "quantization_config", None)
        if isinstance(previous, LowRAHfConfig):
            return dict(previous.options)
    # the whole LowRAConfig it was quantized with (lowra.LowRAConfig.from_dict restores it on load)
    if (config := lowra_config_dict(model, report)) is not None:
        derived["lowra_config"] = config
    return derived


def _hf_suffix(qt_key: str) -> str:
    """``QuantizedTensor.state_dict`` key → the tensor's name under its layer (``b2.codes`` → ``b2_codes``)."""
    return qt_key.replace(".", "_")


def _qt_key(suffix: str) -> str:
    return suffix.replace("_", ".", 1)


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a quantized model under its checkpoint name (tied copies still included).

    ``model.state_dict()`` (LowRA layers contribute ``bias``/``dense_weight``/``lora_A``/``lora_B``)
    plus each quantized layer's ``QuantizedTensor`` tensors as ``<layer>.<suffix>``.
    """
    state = dict(model.state_dict())
    for name, m in lowra_layers(model):
        if m.is_quantized:
            for key, t in m.qweight.state_dict().items():
                state[f"{name}.{_hf_suffix(key)}"] = t
    return state


def layer_layout(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, Any]]:
    """``{layer: LayerSpec}`` of every LowRA layer (see the module docstring); hashes the tensors."""
    state = hf_state_dict(model) if state is None else state
    layout = {}
    for name, m in lowra_layers(model):
        suffixes = [s for s in (*_DENSE_KEYS, *_ADAPTER_KEYS) if f"{name}.{s}" in state]
        if m.is_quantized:
            suffixes += [_hf_suffix(k) for k in m.qweight.state_dict()]
        tensors = {}
        for s in suffixes:
            t = state[f"{name}.{s}"]
            tensors[s] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "sha256": tensor_sha256(t)}
        layout[name] = {
            "shape": [m.out_features, m.in_features],
            "rank": m.rank,
            "alpha": m.alpha,
            "dropout": float(getattr(m.lora_dropout, "p", 0.0)),
            "quantized": m.qweight.metadata() if m.is_quantized else None,
            "tensors": tensors,
        }
    return layout


def guard_name(layout: dict[str, dict[str, Any]]) -> str:
    """The plain ``<layer>.weight`` name under which a LowRA folder stores ``guard_tensor()``."""
    return f"{min(layout)}.weight"


def guard_tensor() -> torch.Tensor:
    """uint8 ``[1]``, stored under ``guard_name``: a shape no ``nn.Linear`` weight has. transformers without
    LowRA skips the unknown ``quant_method`` and would return the model with its projections randomly
    initialised (issue 32); this tensor makes it refuse the folder with a size-mismatch error instead.
    With ``import lowra`` the quantizer reads it into the layer's stand-in and drops it."""
    return torch.zeros(1, dtype=torch.uint8)


def _is_guard(header_entry: dict[str, Any]) -> bool:
    return header_entry.get("dtype") == "U8" and list(header_entry.get("shape", [])) == [1]


def dense_digests(state: dict[str, torch.Tensor], layout: dict[str, dict[str, Any]]) -> dict[str, str]:
    """sha256 of every tensor of ``state`` that no layer of ``layout`` describes (embeddings, norms,
    ``lm_head``, dense layers): with the layout's own digests, every stored byte is covered."""
    covered = {f"{name}.{suffix}" for name, spec in layout.items() for suffix in spec["tensors"]}
    return {k: tensor_sha256(t) for k, t in state.items() if k not in covered}


def verify_stored_digests(path: str | os.PathLike, header: dict[str, dict[str, Any]], digests: dict[str, str]) -> None:
    """Hash the stored bytes of each tensor of one safetensors file (``header``: ``safetensors_header``)
    that ``digests`` names, reading the file in 1 MiB pieces (no tensor is built); FormatError on a
    mismatch, naming the tensor and the file."""
    names = sorted((k for k in header if k in digests), key=lambda k: int(header[k]["data_offsets"][0]))
    if not names:
        return
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        for name in names:
            start, end = (int(o) for o in header[name]["data_offsets"])
            f.seek(8 + n + start)
            h, left = hashlib.sha256(), end - start
            while left > 0:
                piece = f.read(min(left, 1 << 20))
                if not piece:
                    break
                h.update(piece)
                left -= len(piece)
            if h.hexdigest() != digests[name]:
                raise FormatError(f"tensor {name} in {Path(path).name} fails its sha256 check (the checkpoint was "
                                  "corrupted or modified after it was saved)")


# ---------------------------------------------------------------------------------- config
def _check_layout(layout: Any) -> dict[str, dict[str, Any]]:
    """Validate a ``layout`` read from a config.json; FormatError naming the first bad entry."""
    if not isinstance(layout, dict) or not layout:
        raise FormatError("quantization_config.layout must be a non-empty {layer: spec} mapping")
    for name, spec in layout.items():
        where = f"quantization_config.layout[{name!r}]"
        if not isinstance(spec, dict):
            raise FormatError(f"{where} is not a mapping")
        for key in ("shape", "rank", "alpha", "quantized", "tensors"):
            if key not in spec:
                raise FormatError(f"{where} lacks {key!r}")
        shape = spec["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
            raise FormatError(f"{where}.shape must be [out, in] positive integers, got {shape!r}")
        rank = spec["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise FormatError(f"{where}.rank must be a non-negative integer, got {rank!r}")
        if not isinstance(spec["alpha"], (int, float)) or isinstance(spec["alpha"], bool):
            raise FormatError(f"{where}.alpha must be a number, got {spec['alpha']!r}")
        if spec["quantized"] is not None and not isinstance(spec["quantized"], dict):
            raise FormatError(f"{where}.quantized must be a QuantizedTensor header or null")
        tensors = spec["tensors"]
        if not isinstance(tensors, dict):
            raise FormatError(f"{where}.tensors is not a mapping")
        for suffix, t in tensors.items():
            known = suffix in _DENSE_KEYS or suffix in _ADAPTER_KEYS or _QT_SUFFIX.match(suffix)
            if not known:
                raise FormatError(f"{where}.tensors has an unknown tensor {suffix!r}")
            ok = (isinstance(t, dict) and t.get("dtype") in _DTYPES and isinstance(t.get("shape"), list)
                  and all(isinstance(d, int) and d >= 0 for d in t["shape"]) and isinstance(t.get("sha256"), str))
            if not ok:
                raise FormatError(f"{where}.tensors[{suffix!r}] must be {{dtype, shape, sha256}}, got {t!r}")
        wanted = set(_ADAPTER_KEYS) if rank else set()
        if spec["quantized"] is None:
            wanted.add("dense_weight")
        missing = wanted - set(tensors)
        if missing:
            raise FormatError(f"{where}.tensors lacks {sorted(missing)}")
    return layout


class LowRAHfConfig(QuantizationConfigMixin):
    """``quantization_config`` of a LowRA checkpoint (``quant_method="lowra"``).

    Args:
        layout: ``{layer: LayerSpec}`` (``layer_layout``); what the quantizer rebuilds.
        dense: ``{tensor name: sha256}`` of every other stored tensor (embeddings, norms, ``lm_head``, …;
            ``dense_digests``), checked before loading; ``None`` in folders written before it existed.
        format_version: the folder layout version (this LowRA reads ``HF_FORMAT_VERSION``).
        source_model: id or path of the original full-precision model.
        **options: the quantization options (``quantization_config_dict``), kept as given.
    Raises:
        FormatError (a ValueError): another ``quant_method``, an unknown format version, a
            malformed layout.
    """

    def __init__(
        self,
        layout: dict[str, dict[str, Any]] | None = None,
        format_version: int = HF_FORMAT_VERSION,
        source_model: str | None = None,
        quant_method: str = QUANT_METHOD,
        dense: dict[str, str] | None = None,
        **options: Any,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise FormatError(f"not a LowRA quantization_config (quant_method={quant_method!r})")
        if format_version != HF_FORMAT_VERSION:
            raise FormatError(f"unsupported LowRA checkpoint format version {format_version!r} "
                              f"(this LowRA reads {HF_FORMAT_VERSION})")
        self.quant_method = QUANT_METHOD
        self.format_version = HF_FORMAT_VERSION
        self.source_model = source_model
        self.options = dict(options)
        self.layout = _check_layout(layout) if layout is not None else None
        if dense is not None and not (isinstance(dense, dict) and all(
                isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in dense.items())):
            raise FormatError("quantization_config.dense must map tensor names to sha256 hex digests")
        self.dense = dict(dense) if dense is not None else None

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build from a ``config.json`` ``quantization_config`` (a copy; kwargs are not options)."""
        if not isinstance(config_dict, dict):
            raise FormatError(f"quantization_config must be a mapping, got {type(config_dict).__name__}")
        config = cls(**copy.deepcopy(config_dict))
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        """``{"quant_method", "format_version", **options, "source_model", "layout", "dense"}`` (JSON-able;
        ``dense`` only where known)."""
        clash = set(self.options) & set(_RESERVED)
        if clash:
            raise ValueError(f"quantization options may not use the reserved names {sorted(clash)}")
        return {"quant_method": self.quant_method, "format_version": self.format_version,
                **copy.deepcopy(self.options), "source_model": self.source_model,
                "layout": copy.deepcopy(self.layout),
                **({"dense": dict(self.dense)} if self.dense is not None else {})}

    def __iter__(self):
        yield from self.to_dict().items()


def is_lowra_hf_folder(directory: str | os.PathLike) -> bool:
    """True if ``directory/config.json`` has a ``quantization_config`` with ``quant_method="lowra"``."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    q = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


# ---------------------------------------------------------------------------------- loading
def safetensors_header(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{name: {"dtype", "shape", "data_offsets"}}`` of a safetensors file, checked against its size.

    Reads only the header; a truncated, padded or non-safetensors file raises FormatError naming it.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise FormatError(f"{path.name}: LowRA checkpoints load from safetensors files only")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
        raise FormatError(f"{path} is not a readable safetensors file (truncated or foreign?): {exc!r}") from None
    if size != 8 + n + end:
        raise FormatError(f"{path} has {size} bytes but its header describes {8 + n + end} (truncated or modified)")
    return header


@contextlib.contextmanager
def verification(enabled: bool):
    """Within the block, LowRA loads check (``True``, the default) or skip the tensors' sha256."""
    token = _VERIFY.set(bool(enabled))
    try:
        yield
    finally:
        _VERIFY.reset(token)


class _LowRASlot(nn.Module):
    """Stand-in for a ``LowRALinear`` while transformers loads: one meta tensor per stored tensor.

    transformers fills the buffers (and the ``lora_A``/``lora_B`` parameters) by name; the
    quantizer then turns the slot into a ``LowRALinear`` (``_process_model_after_weight_loading``).
    """

    def __init__(self, spec: dict[str, Any], guarded: bool = False) -> None:
        super().__init__()
        self.spec = spec
        if guarded:  # the folder's guard_tensor(), read here and dropped with the slot
            self.register_buffer("weight", torch.empty(1, dtype=torch.uint8, device="meta"))
        for suffix, t in spec["tensors"].items():
            empty = torch.empty(t["shape"], dtype=_DTYPES[t["dtype"]], device="meta")
            if suffix in _ADAPTER_KEYS:
                self.register_parameter(suffix, nn.Parameter(empty, requires_grad=empty.is_floating_point()))
            else:
                self.register_buffer(suffix, empty)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called
        raise RuntimeError("a LowRA layer was used before its checkpoint was loaded")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _rebuild(name: str, slot: _LowRASlot) -> LowRALinear:
    """The ``LowRALinear`` of a filled slot, its structure and finiteness checked (the digests of its stored
    bytes were checked before loading: ``verify_folder``)."""
    spec = slot.spec
    tensors = {s: getattr(slot, s) for s in spec["tensors"]}
    for s, t in tensors.items():
        if t is None or t.device.type == "meta":
            raise FormatError(f"tensor {name}.{s} was not loaded from the checkpoint")
    if spec["quantized"] is not None:
        parts = {_qt_key(s): t for s, t in tensors.items() if _QT_SUFFIX.match(s)}
        try:
            base: QuantizedTensor | torch.Tensor = QuantizedTensor.from_state_dict(parts, spec["quantized"])
        except FormatError as exc:
            raise FormatError(f"layer {name!r}: {exc}") from None
        if base.shape != tuple(spec["shape"]):
            raise FormatError(f"layer {name!r}: stored codes have shape {base.shape}, layout says {spec['shape']}")
    else:
        base = tensors["dense_weight"].detach()
        if tuple(base.shape) != tuple(spec["shape"]):
            raise FormatError(f"layer {name!r}: dense base has shape {tuple(base.shape)}, layout says {spec['shape']}")
    lora_A, lora_B = tensors.get("lora_A"), tensors.get("lora_B")
    try:
        return LowRALinear(
            base, bias=tensors.get("bias"), rank=spec["rank"], alpha=float(spec["alpha"]),
            dropout=float(spec.get("dropout", 0.0)), adapter_dtype=lora_A.dtype if lora_A is not None else None,
            lora_A=lora_A.detach() if lora_A is not None else None,
            lora_B=lora_B.detach() if lora_B is not None else None,
        )
    except ValueError as exc:
        raise FormatError(f"layer {name!r}: {exc}") from None


def verify_folder(folder: str | os.PathLike, checkpoint_files: list[str] | None = None) -> None:
    """Check a LowRA folder before any tensor loads: ``lowra_checksums.json`` (every file, ``config.json``
    included, and each weight shard's header), then every stored tensor's bytes against the digests of
    ``config.json`` (``layout`` and ``dense``). FormatError naming the file or the tensor.

    Args:
        checkpoint_files: the shards transformers is about to read; each must be a listed weight file.
    """
    from lowra.integrity import CHECKSUMS, verify_checksums

    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file():
        raise FormatError(f"{folder} has no {CHECKSUMS} (written by an older LowRA? a hub download fetches the "
                          "model files only: snapshot_download the whole repository); nothing proves its files "
                          "are intact: lowra.hf.verification(False) (load_quantized(verify=False)) accepts it "
                          "unchecked")
    manifest = verify_checksums(folder, kinds=(QUANT_METHOD,))
    weights = sorted(n for n, e in manifest["files"].items() if "header_sha256" in e)
    for f in checkpoint_files or ():
        if Path(f).parent != folder or Path(f).name not in weights:
            raise FormatError(f"{Path(f).name} is not a weight file listed in {folder / CHECKSUMS}")
    try:  # config.json's bytes were just checked: these are the digests written with the tensors
        q = json.loads((folder / "config.json").read_text())["quantization_config"]
        digests = {f"{name}.{suffix}": t["sha256"] for name, spec in q["layout"].items()
                   for suffix, t in spec["tensors"].items()}
        digests.update(q["dense"])
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise FormatError(f"{folder}/config.json lacks the tensors' digests (quantization_config.layout / dense): "
                          f"{exc!r}") from None
    for name in weights:
        header = safetensors_header(folder / name)
        verify_stored_digests(folder / name, header, digests)
        unhashed = sorted(set(header) - set(digests))
        if unhashed:
            raise FormatError(f"tensors {unhashed[:5]} of {name} have no digest in config.json")


def _save_pretrained_with_checksums(self: nn.Module, save_directory: str | os.PathLike, *args: Any,
                                    **kwargs: Any) -> Any:
    """``PreTrainedModel.save_pretrained``, then the folder's ``lowra_checksums.json`` (on the main process)."""
    from lowra.integrity import write_checksums

    result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", args[0] if args else True):  # save_pretrained(dir, is_main_process, …)
        folder = Path(save_directory)
        index = folder / "model.safetensors.index.json"
        weights = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {
            "model.safetensors"}
        write_checksums(folder, QUANT_METHOD, header_only=tuple(sorted(weights)))
    return result


class LowRAHfQuantizer(HfQuantizer):
    """transformers' loader for LowRA checkpoints (pre-quantized only: nothing is quantized on load).

    Before loading, each target ``nn.Linear`` of the empty model becomes a ``_LowRASlot`` whose
    tensors have the layout's dtypes and shapes (checked against the shard headers first); after
    loading, each slot becomes a ``LowRALinear`` and only the adapters stay trainable, as
    ``lowra.load_quantized`` leaves a model. ``save_pretrained`` writes the same format back.
    """

    requires_calibration = True  # LowRA quantizes with lowra.quantize_model, never inside from_pretrained
    quantization_config: LowRAHfConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and len({str(d) for d in device_map.values()}) > 1:
            raise ValueError("LowRA checkpoints load onto one device (device_map='cpu', 'cuda', …), "
                             f"not split over {sorted({str(d) for d in device_map.values()})}")
        if self.quantization_config.layout is None:
            raise FormatError("the LowRA quantization_config has no layout (not a saved LowRA checkpoint)")

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        layout = self.quantization_config.layout
        if not checkpoint_files:
            raise FormatError("a LowRA checkpoint loads from its safetensors files (none were found)")
        if _VERIFY.get():
            verify_folder(Path(checkpoint_files[0]).parent, checkpoint_files)
        stored: dict[str, dict[str, Any]] = {}
        guard = guard_name(layout) if layout else None
        for f in checkpoint_files:
            stored.update(safetensors_header(f))
        for key in [k for k, h in stored.items() if k != guard and k.endswith(".weight") and _is_guard(h)]:
            del stored[key]  # a guard where the layout has no layer: that layer's weight is what is missing
        if guard not in stored or not _is_guard(stored[guard]):
            guard = None  # folders written before the guard existed
        for name, spec in layout.items():
            saved_linear(model, name, spec["shape"], FormatError)
            for suffix, t in spec["tensors"].items():
                key = f"{name}.{suffix}"
                if key not in stored:
                    raise FormatError(f"tensor {key} is missing from the checkpoint files")
                got = stored[key]
                if got.get("dtype") != t["dtype"] or list(got.get("shape", [])) != t["shape"]:
                    raise FormatError(f"tensor {key} is {got.get('dtype')} {got.get('shape')} in the checkpoint "
                                      f"but {t['dtype']} {t['shape']} in its layout")
            _set_module(model, name, _LowRASlot(spec, guarded=f"{name}.weight" == guard))
        expected = set(model.state_dict())
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        missing = sorted(expected - set(stored) - tied)
        if missing:
            raise FormatError(f"the checkpoint lacks tensors {missing[:5]}{' …' if len(missing) > 5 else ''}")
        prefixes = tuple(f"{name}." for name in layout)
        unexpected = sorted(k for k in stored if k.startswith(prefixes) and k not in expected)
        if unexpected:
            raise FormatError(f"the checkpoint has tensors its layout does not describe: {unexpected[:5]}")
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for name, slot in [(n, m) for n, m in model.named_modules() if isinstance(m, _LowRASlot)]:
            _set_module(model, name, _rebuild(name, slot))
        mark_only_lora_trainable(model)
        # its save_pretrained writes a LowRA folder, which needs its lowra_checksums.json to load
        model.save_pretrained = types.MethodType(_save_pretrained_with_checksums, model)
        saved = getattr(self.quantization_config, "options", {}).get("lowra_config")
        if saved is not None:  # folders written before LowRAConfig have none
            from lowra.config import LowRAConfig

            try:
                model.lowra_config = LowRAConfig.from_dict(saved)
            except ValueError as exc:
                raise ValueError(f"quantization_config.lowra_config is not a valid LowRAConfig: {exc}") from None
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """``save_pretrained``'s tensors: ``hf_state_dict`` and the guard; the layout (new adapter digests)
        and the dense digests are refreshed."""
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        state = hf_state_dict(model)
        layout = layer_layout(model, state)
        state[guard_name(layout)] = guard_tensor()
        stored = remove_tied_weights_from_state_dict(dict(state), model)  # what save_pretrained writes
        self.quantization_config.layout = layout
        self.quantization_config.dense = dense_digests(stored, layout)
        return state, {}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


# ---------------------------------------------------------------------------------- registration
def register() -> None:
    """Register ``quant_method="lowra"`` with transformers (idempotent; ``import lowra`` calls it)."""
    from transformers.quantizers import auto

    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not LowRAHfConfig:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantization_config(QUANT_METHOD)(LowRAHfConfig)
    if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LowRAHfQuantizer:
        auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantizer(QUANT_METHOD)(LowRAHfQuantizer)


register()  # importing lowra.hf is enough (lowra/__init__.py arranges it on ``import lowra``)
