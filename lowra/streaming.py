"""Quantize a model larger than memory: stream a sharded safetensors checkpoint block by block.

``quantize_pretrained(model_dir, out_dir, bits, ...)`` produces the same quantized model as
loading the full-precision model and calling ``lowra.quantize_model`` (same options: the codes,
codebooks, scales and plan are identical bit for bit), without ever holding the full-precision
model. It reads the checkpoint's safetensors shards memory-mapped (``safetensors.safe_open``), one
tensor at a time, and works through the transformer blocks in module order:

1. **pass 1** (``method="lowra"`` with a plan): per target layer ``learn_codebooks`` → its codebooks
   and its error table ``[out, K]`` (``lowra.error_tables.row_error_table``); each block's results
   are written to the partial directory as they finish;
2. **plan**: one ``assign_precision`` over the rows of the whole model (``lowra.model._solve_plan``,
   the in-memory path's own call);
3. **pass 2**: per layer the quantizer with the fixed plan and codebooks, LoftQ
   (``lowra.loftq.loftq_init``) and the ``LowRALinear`` that holds the codes and adapters; each
   finished block is written as one safetensors shard of the partial directory;
4. **assemble**: the quantized model is built on the meta device, its quantized layers filled from
   the block shards and its other tensors (embeddings, norms, ``lm_head``) from the source, and
   saved with ``lowra.save_quantized`` (so ``lowra.load_quantized`` reads it like any other save).

Memory: the full-precision weights held at any time are ONE target layer (plus its LoftQ SVD
workspace); the source mapping of a shard is opened per tensor and closed right after, so the
mapped pages do not accumulate. The assembled model is the quantized model (codes + adapters +
the non-quantized tensors), i.e. what training needs anyway.

Resume: the partial directory ``<out_dir>.partial/`` holds ``progress.json`` (the finished blocks
of each pass, written atomically after each block file) and the block files (each written
atomically). A rerun with the same source and options skips every finished block; a rerun with
other options or another source is refused (``resume=False`` starts over). The partial directory is
removed once the final checkpoint is saved.

Not streamable: error tables and adapter inits that need data through the whole model
(``error=fisher|kfac|measured``, ``init="calibrated"``, ``fisher_codebooks``, quantizers that need
calibration Hessians such as OPTQ) and ``method="none"``: they raise a ValueError that says to use
``quantize_model`` on the model in memory.

``PeakMemory`` measures each stage's peak host RSS (``/proc/self/status`` VmHWM, reset per stage
through ``/proc/self/clear_refs``) and peak CUDA memory; ``StreamResult.stages`` records them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowra.atomic import write_text_atomic
from lowra.format import QuantizedTensor, save_safetensors_atomic
from lowra.model import (
    DEFAULT_SKIP_MODULES,
    METHOD_NONE,
    LayerReport,
    QuantizationReport,
    find_target_linears,
    mark_only_lora_trainable,
)
from lowra.nn import LowRALinear
from lowra.validation import check_budget, check_weight

__all__ = [
    "PeakMemory",
    "available_host_memory",
    "StreamResult",
    "checkpoint_bytes",
    "quantize_pretrained",
    "source_checkpoint",
]

STREAM_FORMAT = "lowra.stream"
STREAM_VERSION = 1
PARTIAL_SUFFIX = ".partial"
PROGRESS = "progress.json"
_INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------- memory
def _read_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process in bytes (0 where ``/proc`` is unavailable)."""
    kb = _read_status_kb("VmRSS")
    return 0 if kb is None else kb * 1024


def peak_rss() -> int:
    """Peak resident set size since the last reset (VmHWM), in bytes."""
    kb = _read_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak host RSS and peak CUDA memory of named stages.

    ``with peaks.stage("pass1"): ...`` (or ``peaks.begin("pass1")`` … ``peaks.end()``) records
    ``{time_s, rss_start_bytes, peak_rss_bytes, peak_device_bytes}`` under ``peaks.stages["pass1"]``
    (a stage entered again accumulates its time and keeps its largest peak). Host peaks come from
    VmHWM, reset at the start of each stage where the kernel allows it (``peak_resettable``;
    otherwise a stage's peak is the process peak so far). The reset also lowers what
    ``getrusage`` reports as the process peak, so ``process_peak_rss`` keeps the true maximum over
    the process's life (including before the first stage). Device peaks are
    ``torch.cuda.max_memory_allocated`` (None without CUDA).
    """

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}
        self.peak_resettable = True
        self.process_peak_rss = 0
        self._open: tuple[str, float] | None = None

    def begin(self, name: str) -> None:
        """Start stage ``name`` (ends a stage still open)."""
        if self._open is not None:
            self.end()
        self.process_peak_rss = max(self.process_peak_rss, peak_rss())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self.peak_resettable = reset_peak_rss() and self.peak_resettable
        entry = self.stages.setdefault(name, {"time_s": 0.0, "rss_start_bytes": current_rss(), "peak_rss_bytes": 0,
                                              "peak_device_bytes": None})
        entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], entry["rss_start_bytes"])
        self._open = (name, time.perf_counter())

    def end(self) -> None:
        """Close the open stage (no-op when none is open)."""
        if self._open is None:
            return
        name, t0 = self._open
        self._open = None
        entry = self.stages[name]
        entry["time_s"] += time.perf_counter() - t0
        peak = peak_rss()
        entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], peak)
        self.process_peak_rss = max(self.process_peak_rss, peak)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            dev = int(torch.cuda.max_memory_allocated())
            entry["peak_device_bytes"] = max(entry["peak_device_bytes"] or 0, dev)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        finally:
            self.end()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{peak_resettable, process_peak_rss_bytes, stages: {name: {...}}}``."""
        return {"peak_resettable": self.peak_resettable,
                "process_peak_rss_bytes": max(self.process_peak_rss, peak_rss()),
                "stages": {k: dict(v) for k, v in self.stages.items()}}


# ---------------------------------------------------------------------------------- source
class _Source:
    """A safetensors checkpoint (one file or an index of shards) read one tensor at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / _INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{index} is not a safetensors index (no weight_map): {exc}") from None
            self.key_file = {str(k): str(v) for k, v in weight_map.items()}
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise ValueError(
                    f"{directory} has no safetensors checkpoint (model.safetensors or {_INDEX}); streaming "
                    "quantization reads safetensors only (convert .bin checkpoints with save_pretrained first)"
                )
            from safetensors import safe_open

            self.key_file = {}
            for name in files:
                with safe_open(str(directory / name), framework="pt") as f:
                    for k in f.keys():
                        self.key_file[k] = name
        for name in set(self.key_file.values()):
            if not (directory / name).is_file():
                raise ValueError(f"the checkpoint index names shard {name}, which is missing from {directory}")

    def files(self) -> list[str]:
        return sorted(set(self.key_file.values()))

    def fingerprint(self) -> dict[str, Any]:
        """Names, sizes and modification times of the shards (a changed source is not resumed)."""
        return {n: [(self.directory / n).stat().st_size, int((self.directory / n).stat().st_mtime)]
                for n in self.files()}

    def load(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor as a private CPU copy (the shard is mapped only while it is read)."""
        from safetensors import safe_open

        if key not in self.key_file:
            raise ValueError(f"tensor {key!r} is not in the checkpoint at {self.directory}")
        with safe_open(str(self.directory / self.key_file[key]), framework="pt", device="cpu") as f:
            t = f.get_tensor(key)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def numel(self) -> int:
        """Total number of elements of every tensor (read from the headers only)."""
        from safetensors import safe_open

        total = 0
        by_file: dict[str, list[str]] = {}
        for k, f in self.key_file.items():
            by_file.setdefault(f, []).append(k)
        for name, keys in by_file.items():
            with safe_open(str(self.directory / name), framework="pt") as f:
                for k in keys:
                    n = 1
                    for d in f.get_slice(k).get_shape():
                        n *= int(d)
                    total += n
        return total


def source_checkpoint(model: str | os.PathLike) -> Path:
    """The local directory of a checkpoint: ``model`` itself, or a Hub id resolved through the cache.

    A Hub id is fetched with ``huggingface_hub.snapshot_download`` (configs and safetensors only;
    ``HF_HUB_OFFLINE=1`` uses the local cache only).
    """
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{model} is a file; quantize_pretrained needs a model directory or a Hub id")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors"])
    except Exception as exc:
        raise ValueError(f"{model!r} is neither a directory nor an available Hub model: {exc}") from exc
    return Path(local)


def checkpoint_bytes(model: str | os.PathLike, dtype: torch.dtype | None = None) -> int:
    """Bytes of the full-precision model in ``dtype`` (default: as stored), from the shard headers.

    What loading the model would take (the runner's ``quant.stream=auto`` compares it with the device).
    """
    directory = source_checkpoint(model)
    src = _Source(directory)
    if dtype is None:
        return sum((directory / n).stat().st_size for n in src.files())
    return src.numel() * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------- skeleton
def _skeleton(directory: Path, arch: str, dtype: torch.dtype | None, trust_remote_code: bool) -> nn.Module:
    """The model built from its config with every tensor on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if arch not in ("causal_lm", "seq2seq"):
        raise ValueError(f"arch must be 'causal_lm' or 'seq2seq', got {arch!r}")
    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    cls = AutoModelForCausalLM if arch == "causal_lm" else AutoModelForSeq2SeqLM
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    with torch.device("meta"):
        model = cls.from_config(config, **kwargs)
    model.name_or_path = str(directory)
    return model


def _block_of(name: str) -> str:
    """The transformer block holding a layer: its name up to the first numeric component."""
    m = re.match(r"^(.*?\.\d+)(\.|$)", name)
    return m.group(1) if m else name


def _blocks(names: list[str]) -> list[tuple[str, list[str]]]:
    """Consecutive target names grouped by block, in module order."""
    out: list[tuple[str, list[str]]] = []
    for n in names:
        b = _block_of(n)
        if out and out[-1][0] == b:
            out[-1][1].append(n)
        else:
            out.append((b, [n]))
    return out


def _source_key(model: nn.Module, src: _Source, key: str) -> str:
    """The checkpoint's name of the model's tensor ``key`` (with or without the base-model prefix)."""
    if key in src.key_file:
        return key
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in src.key_file:
        return key[len(prefix) + 1:]
    if prefix and f"{prefix}.{key}" in src.key_file:
        return f"{prefix}.{key}"
    raise ValueError(f"tensor {key!r} of the model is not in the checkpoint at {src.directory} "
                     f"(it has e.g. {sorted(src.key_file)[:5]})")


# ---------------------------------------------------------------------------------- options
_UNSTREAMABLE = ("it needs calibration data through the whole model in memory; use lowra.quantize_model "
                 "on the loaded model (or a data-free setting: quant.error=sse|relative, quant.init=loftq)")


def _normalize(opts: dict[str, Any]) -> dict[str, Any]:
    """Check and normalize the options exactly as ``quantize_model`` does (same candidates, iters)."""
    from lowra.error_tables import DATA_TABLES, ERROR_TABLES, INITS

    o = dict(opts)
    method = o["method"]
    if method == METHOD_NONE:
        raise ValueError("method='none' keeps the dense bases: there is nothing to stream-quantize; "
                         "load the model with from_pretrained and use lowra.quantize_model")
    if o["codebook"] not in ("learned", "nf"):
        raise ValueError(f"codebook must be 'learned' or 'nf', got {o['codebook']!r}")
    if o["plan"] not in ("ilp", "uniform"):
        raise ValueError(f"plan must be 'ilp' or 'uniform', got {o['plan']!r}")
    o["use_plan"] = bool(o["use_plan"]) and o["plan"] == "ilp"
    if o["error"] not in ERROR_TABLES:
        raise ValueError(f"quant.error must be one of {ERROR_TABLES}, got {o['error']!r}")
    if o["init"] not in INITS:
        raise ValueError(f"quant.init must be one of {INITS}, got {o['init']!r}")
    if o["error"] != "sse" and method != "lowra":
        raise ValueError(f"quant.error={o['error']!r} is an error table of LowRA's planner; method {method!r} has none")
    if method == "lowra" and o["use_plan"] and o["error"] in DATA_TABLES:
        raise ValueError(f"streaming quantization cannot compute quant.error={o['error']}: {_UNSTREAMABLE}")
    if o["fisher_codebooks"]:
        raise ValueError(f"streaming quantization cannot fit Fisher-weighted codebooks: {_UNSTREAMABLE}")
    rank = o["rank"]
    if isinstance(rank, bool) or int(rank) != rank or rank < 0:
        raise ValueError(f"rank must be a non-negative integer, got {rank!r}")
    if o["loftq_iters"] and rank == 0:
        o["loftq_iters"] = 0
    if o["init"] == "calibrated" and o["loftq_iters"] > 0:
        raise ValueError(f"streaming quantization cannot run quant.init=calibrated: {_UNSTREAMABLE}")
    if method != "lowra":
        from lowra.quantizers import get_quantizer

        if getattr(get_quantizer(method), "needs_calibration", False):
            raise ValueError(f"method {method!r} needs calibration Hessians; streaming quantization "
                             f"cannot provide them: {_UNSTREAMABLE}")
    if method == "lowra" and o["codebook"] == "nf":
        o["codebook_iters"] = 0
    if o["budget_kind"] not in ("nominal", "effective"):
        raise ValueError(f"quant.budget_kind must be 'nominal' or 'effective', got {o['budget_kind']!r}")
    if o["budget_kind"] == "effective" and not (method == "lowra" and o["use_plan"]):
        raise ValueError("quant.budget_kind=effective needs method='lowra' with a precision plan (plan='ilp')")
    bits = check_budget(o["bits"], high=16.0 if o["budget_kind"] == "effective" else 4.0)
    o["bits"] = bits
    candidates = tuple(int(b) for b in o["candidates"])
    if method == "lowra" and not o["use_plan"] and float(bits) != round(float(bits)):
        raise ValueError(f"plan='uniform' (use_plan=False) stores every row at one integer width, got a "
                         f"fractional budget bits={bits}")
    if o["budget_kind"] == "nominal" and (method != "lowra" or not o["use_plan"]):
        if float(bits) != round(float(bits)):
            raise ValueError(f"method {method!r} quantizes every row at one integer width, got bits={bits}; a "
                             "fractional budget needs method='lowra' (per-row precision plan)")
        int_bits = int(round(float(bits)))
        if method == "lowra" and int_bits not in candidates:
            candidates = tuple(sorted({*candidates, int_bits}))
    if o["budget_scope"] not in ("model", "matrix"):
        raise ValueError(f"budget_scope must be 'model' or 'matrix', got {o['budget_scope']!r}")
    o["candidates"] = tuple(int(b) for b in candidates)
    return o


def _fingerprint(opts: dict[str, Any], src: _Source, targets: list[str]) -> str:
    def plain(v: Any) -> Any:
        if isinstance(v, torch.dtype):
            return str(v)
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in sorted(v.items())}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if isinstance(v, (str, int, float, bool)) or v is None else repr(v)

    skip = {"progress", "device"}
    blob = json.dumps({"opts": plain({k: v for k, v in opts.items() if k not in skip}),
                       "source": src.fingerprint(), "targets": targets}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------- partial dir
class _Partial:
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


# ---------------------------------------------------------------------------------- result
@dataclass
class StreamResult:
    """What ``quantize_pretrained`` did.

    ``report`` is the ``QuantizationReport`` (as ``quantize_model`` returns; also in the saved
    manifest); ``stages`` per stage ``{time_s, rss_start_bytes, peak_rss_bytes, peak_device_bytes}``;
    ``resumed`` the blocks of each pass taken from an interrupted run; ``source_bytes`` the size of
    the source shards.
    """

    out_dir: Path
    report: QuantizationReport
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    resumed: dict[str, int] = field(default_factory=dict)
    source_bytes: int = 0
    peak_resettable: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "stages": self.stages, "resumed": self.resumed,
                "source_bytes": self.source_bytes, "peak_resettable": self.peak_resettable,
                "report": self.report.to_dict()}


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="block", leave=False)


# ---------------------------------------------------------------------------------- main entry
def quantize_pretrained(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    bits: float,
    method: str = "lowra",
    rank: int = 16,
    alpha: float = 16.0,
    target_modules: str | list[str] | tuple[str, ...] | None = None,
    loftq_iters: int = 1,
    group_size: int = 64,
    *,
    dropout: float = 0.0,
    double_quant: bool = False,
    candidates: tuple[int, ...] = (1, 2, 4),
    budget_scope: str = "model",
    use_plan: bool = True,
    skip_modules: tuple[str, ...] | list[str] = DEFAULT_SKIP_MODULES,
    codebook_iters: int = 20,
    weight_power: float = 2.0,
    plan_options: dict[str, Any] | None = None,
    adapter_dtype: torch.dtype | None = None,
    backend: str = "auto",
    progress: bool = True,
    codebook: str = "learned",
    plan: str = "ilp",
    error: str = "sse",
    fisher_codebooks: bool = False,
    init: str = "loftq",
    init_damp: float = 0.01,
    budget_kind: str = "nominal",
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    arch: str = "causal_lm",
    trust_remote_code: bool = False,
    resume: bool = True,
    calibration: Any = None,
    **quant_options: Any,
) -> StreamResult:
    """Quantize the checkpoint in ``model_dir`` into ``out_dir`` without loading the full model.

    Args:
        model_dir: a directory with ``config.json`` and safetensors shards (``model.safetensors`` or
            an index), or a Hub id (resolved through the local cache, see ``source_checkpoint``).
        out_dir: where the quantized model is saved (``lowra.save_quantized``; read it back with
            ``lowra.load_quantized``). ``<out_dir>.partial/`` holds the work of an unfinished run.
        bits, method, rank, alpha, target_modules, loftq_iters, group_size, and every keyword up to
            ``budget_kind``: as ``lowra.quantize_model`` (same defaults, same meaning); the quantized
            codes are identical to that path's for the same model and options.
        dtype: dtype the weights are read in (as ``from_pretrained(dtype=...)``; None: as stored).
            The in-memory path quantizes ``linear.weight`` in the model's dtype, so match them.
        device: where each layer is quantized (``"cuda"``: one layer at a time on the GPU).
        arch: ``"causal_lm"`` or ``"seq2seq"`` (the Auto class the skeleton is built from).
        resume: continue an interrupted run found in ``<out_dir>.partial/`` (same source and
            options); False discards it.
        calibration: not supported (data-driven settings need the model in memory): must be None.
    Returns:
        A ``StreamResult`` (report, per-stage time and peak memory, resumed block counts).
    Raises:
        ValueError: an unstreamable setting (data-driven error table, calibrated init, OPTQ,
            ``method="none"``), a source without safetensors, a target missing from the checkpoint,
            NaN/Inf weights, or any option ``quantize_model`` refuses.
    """
    from lowra.quantize_layers import layer_quantizer as _layer_quantizer
    from lowra.quantize_layers import timed_init
    from lowra.stages import _solve_plan

    t_start = time.perf_counter()
    peaks = PeakMemory()
    if calibration is not None:
        raise ValueError(f"quantize_pretrained does not use calibration data: {_UNSTREAMABLE}")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype (e.g. 'bfloat16'), got {dtype!r}")
        dtype = getattr(torch, dtype)
    device = torch.device(device)
    opts = _normalize(dict(
        bits=bits, method=method, rank=rank, alpha=alpha, target_modules=target_modules, loftq_iters=loftq_iters,
        group_size=group_size, dropout=dropout, double_quant=double_quant, candidates=candidates,
        budget_scope=budget_scope, use_plan=use_plan, skip_modules=tuple(skip_modules),
        codebook_iters=codebook_iters, weight_power=weight_power, plan_options=dict(plan_options or {}),
        adapter_dtype=adapter_dtype, backend=backend, codebook=codebook, plan=plan, error=error,
        fisher_codebooks=fisher_codebooks, init=init, init_damp=init_damp, budget_kind=budget_kind, dtype=dtype,
        arch=arch, quant_options=dict(quant_options),
    ))
    bits, candidates, loftq_iters = opts["bits"], opts["candidates"], opts["loftq_iters"]
    codebook_iters, use_plan = opts["codebook_iters"], opts["use_plan"]
    out_dir = Path(out_dir)

    with peaks.stage("setup"):
        directory = source_checkpoint(model_dir)
        src = _Source(directory)
        source_bytes = sum((directory / n).stat().st_size for n in src.files())
        model = _skeleton(directory, arch, dtype, trust_remote_code)
        targets = find_target_linears(model, target_modules, skip_modules)
        names = [n for n, _ in targets]
        shapes = {n: (m.out_features, m.in_features) for n, m in targets}
        has_bias = {n: m.bias is not None for n, m in targets}
        for n in names:
            if rank > min(shapes[n]):
                raise ValueError(f"layer {n!r} {shapes[n]} is too small for rank {rank}")
        weight_keys = {n: _source_key(model, src, f"{n}.weight") for n in names}
        bias_keys = {n: _source_key(model, src, f"{n}.bias") for n in names if has_bias[n]}
        blocks = _blocks(names)
        partial = _Partial(out_dir.parent / (out_dir.name + PARTIAL_SUFFIX),
                           _fingerprint(opts, src, names), resume)
    resumed = {"pass1": 0, "pass2": 0}

    def load_weight(name: str) -> torch.Tensor:
        w = src.load(weight_keys[name], dtype).to(device)
        check_weight(w, f"layer {name!r} weight")
        if tuple(w.shape) != shapes[name]:
            raise ValueError(f"layer {name!r}: the checkpoint's weight has shape {tuple(w.shape)}, "
                             f"the config builds {shapes[name]}")
        return w

    report = QuantizationReport(
        method=method, bits_target=float(bits), bits_nominal=0.0, bits_effective=0.0, rank=int(rank),
        alpha=float(alpha), loftq_iters=int(loftq_iters), group_size=int(group_size),
        double_quant=bool(double_quant), candidates=tuple(candidates),
        num_params=sum(shapes[n][0] * shapes[n][1] for n in names),
    )
    report.error_table = error if method == "lowra" and use_plan else None
    report.init = init if loftq_iters > 0 else "lora"
    report.budget_kind = budget_kind
    times = {"codebooks_s": 0.0, "plan_s": 0.0, "quantize_s": 0.0, "loftq_s": 0.0}

    # ---- pass 1: codebooks + error tables, block by block
    layer_bits: dict[str, torch.Tensor] = {}
    codebooks: dict[str, dict[int, torch.Tensor]] = {}
    if method == "lowra" and use_plan:
        from lowra.codebook import learn_codebooks
        from lowra.error_tables import row_error_table
        from lowra.format import row_storage_bits

        errors: dict[str, torch.Tensor] = {}
        with peaks.stage("pass1_codebooks"), _bar(len(blocks), "pass 1 (codebooks)", progress) as bar:
            for i, (_, block_names) in enumerate(blocks):
                if partial.done("pass1", i):
                    tensors, _ = partial.read("pass1", i)
                    resumed["pass1"] += 1
                else:
                    t0 = time.perf_counter()
                    tensors = {}
                    for name in block_names:
                        w = load_weight(name)
                        result = learn_codebooks(w, bits=candidates, group_size=group_size, iters=codebook_iters,
                                                 weight_power=weight_power, double_quant=double_quant)
                        for b, c in result.codebooks.items():
                            tensors[f"{name}/codebook.{b}"] = c.cpu()
                        tensors[f"{name}/error"] = row_error_table(error, result.error, w).cpu()
                        del w, result
                    partial.write("pass1", i, tensors, {"time_s": time.perf_counter() - t0})
                for name in block_names:
                    codebooks[name] = {b: tensors[f"{name}/codebook.{b}"] for b in candidates}
                    errors[name] = tensors[f"{name}/error"]
                if bar is not None:
                    bar.update(1)
        times["codebooks_s"] = peaks.stages["pass1_codebooks"]["time_s"]

        # ---- the plan, on the whole model's table
        with peaks.stage("plan"):
            if partial.state["plan"] and partial.file("plan").is_file():
                tensors, meta = partial.read("plan")
                layer_bits = {n: tensors[n].to(torch.int64) for n in names}
                report.plan = meta["plan"]
            else:
                params = [torch.full((shapes[n][0],), shapes[n][1], dtype=torch.int64) for n in names]
                costs = None
                if budget_kind == "effective":
                    costs = [torch.tensor([row_storage_bits(shapes[n][1], b, group_size, double_quant)
                                           for b in candidates], dtype=torch.int64).expand(shapes[n][0], -1)
                             for n in names]
                try:
                    per_layer, report.plan = _solve_plan([errors[n] for n in names], params, bits, candidates,
                                                         budget_scope, dict(plan_options or {}), costs)
                except ValueError as exc:
                    if budget_kind != "effective":
                        raise
                    raise ValueError(f"quant.budget_kind=effective, bits={bits}: {exc}") from exc
                layer_bits = dict(zip(names, per_layer))
                from lowra.report import _jsonable

                report.plan = _jsonable(report.plan)
                partial.write("plan", None, {n: b.to(torch.int8) for n, b in layer_bits.items()},
                              {"plan": report.plan})
            del errors
        times["plan_s"] = peaks.stages["plan"]["time_s"]

    # ---- pass 2: quantize + LoftQ per layer, one block file at a time
    module_kw = dict(rank=rank, alpha=alpha, dropout=dropout, adapter_dtype=adapter_dtype, backend=backend)
    layer_reports: dict[str, LayerReport] = {}
    with peaks.stage("pass2_quantize"), _bar(len(blocks), "pass 2 (quantize)", progress) as bar:
        for i, (_, block_names) in enumerate(blocks):
            if partial.done("pass2", i):
                meta = _read_header(partial.file("pass2", i))
                resumed["pass2"] += 1
            else:
                tensors, meta = {}, {"layers": {}, "times": {"quantize_s": 0.0, "loftq_s": 0.0}}
                for name in block_names:
                    w = load_weight(name)
                    if has_bias[name]:
                        check_weight(src.load(bias_keys[name], dtype)[None], f"layer {name!r} bias")
                    quantize_fn = _layer_quantizer(
                        method, layer_bits.get(name), codebooks.pop(name, None), bits, group_size, double_quant,
                        codebook_iters, weight_power, backend, w.device, dict(quant_options), importance=None,
                    )
                    result, quantize_s, loftq_s = timed_init(
                        quantize_fn,
                        lambda fn, w=w, n=name: loftq_init_fn(w, fn, rank, alpha, loftq_iters, n, init_damp))
                    meta["times"]["quantize_s"] += quantize_s
                    meta["times"]["loftq_s"] += loftq_s
                    qt = result.qweight
                    # the module the in-memory path builds (its adapter dtype / casting, its RNG use)
                    new = LowRALinear(qt, lora_A=result.lora_A, lora_B=result.lora_B, **module_kw)
                    for k, t in new.qweight.state_dict().items():
                        tensors[f"{name}/{k}"] = t
                    if new.rank:
                        tensors[f"{name}.lora_A"] = new.lora_A.detach()
                        tensors[f"{name}.lora_B"] = new.lora_B.detach()
                    hist = Counter(qt.bits_per_row.tolist())
                    lr = LayerReport(name, shapes[name], {int(k): int(v) for k, v in sorted(hist.items())},
                                     qt.nominal_bits, qt.effective_bits, result.sse_quant, result.sse,
                                     result.best_iter)
                    meta["layers"][name] = {"quantized": qt.metadata(), "report": asdict(lr)}
                    del w, result, qt, new
                partial.write("pass2", i, tensors, meta)
                del tensors
            times["quantize_s"] += meta["times"]["quantize_s"]
            times["loftq_s"] += meta["times"]["loftq_s"]
            for name in block_names:
                r = dict(meta["layers"][name]["report"])
                r["shape"] = tuple(r["shape"])
                r["bits_histogram"] = {int(k): int(v) for k, v in r["bits_histogram"].items()}
                layer_reports[name] = LayerReport(**r)
            if bar is not None:
                bar.update(1)
    codebooks.clear()

    reports = [layer_reports[n] for n in names]
    total = report.num_params
    sizes = [lr.shape[0] * lr.shape[1] for lr in reports]
    report.layers = reports
    report.bits_nominal = sum(lr.nominal_bits * n for lr, n in zip(reports, sizes)) / total
    report.bits_effective = sum(lr.effective_bits * n for lr, n in zip(reports, sizes)) / total
    report.total_sse_quant = sum(lr.sse_quant for lr in reports)
    report.total_sse = sum(lr.sse_loftq for lr in reports)

    # ---- assemble the quantized model and save it through the public format
    with peaks.stage("assemble_save"):
        _assemble(model, src, partial, blocks, has_bias, bias_keys, dtype, module_kw)
        times["total_s"] = time.perf_counter() - t_start
        report.times = times
        model.lowra_report = report
        from lowra.checkpoint import save_quantized

        save_quantized(model, out_dir, report=report, source_model=str(model_dir))
        del model
    report.times["total_s"] = time.perf_counter() - t_start
    shutil.rmtree(partial.path, ignore_errors=True)
    return StreamResult(out_dir=out_dir, report=report, stages=peaks.to_dict()["stages"], resumed=resumed,
                        source_bytes=source_bytes, peak_resettable=peaks.peak_resettable)


def loftq_init_fn(w: torch.Tensor, quantize_fn: Any, rank: int, alpha: float, iters: int, name: str,
                  damp: float) -> Any:
    """``lowra.loftq.loftq_init`` as the in-memory path calls it (plain LoftQ, no Hessian)."""
    from lowra.loftq import loftq_init

    return loftq_init(w, quantize_fn, rank, alpha, iters=iters, name=f"layer {name!r}", hessian=None, damp=damp)


def _read_header(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["lowra_stream"])


def _assemble(
    model: nn.Module,
    src: _Source,
    partial: _Partial,
    blocks: list[tuple[str, list[str]]],
    has_bias: dict[str, bool],
    bias_keys: dict[str, str],
    dtype: torch.dtype | None,
    module_kw: dict[str, Any],
) -> None:
    """Fill the meta ``model``: LowRALinear layers from the pass-2 block files, the rest from the source."""
    from lowra.layers import set_module as _set_module

    targets = set()
    for i, (_, block_names) in enumerate(blocks):
        tensors, meta = partial.read("pass2", i)
        for name in block_names:
            prefix = f"{name}/"
            qstate = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            qt = QuantizedTensor.from_state_dict(qstate, meta["layers"][name]["quantized"])
            lora_A, lora_B = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
            bias = src.load(bias_keys[name], dtype) if has_bias[name] else None
            kw = dict(module_kw)
            if lora_A is not None:
                kw["adapter_dtype"] = lora_A.dtype
            new = LowRALinear(qt, bias=bias, lora_A=lora_A, lora_B=lora_B, **kw)
            _set_module(model, name, new)
            targets.add(name)
        del tensors
    # every other persistent tensor (embeddings, norms, lm_head, biases of other layers) from the source
    wanted = [k for k in model.state_dict() if not k.endswith((".lora_A", ".lora_B"))
              and not any(k == f"{n}.bias" for n in targets)]
    tied = _tied_keys(model)
    rest = {}
    for key in wanted:
        try:
            rest[key] = src.load(_source_key(model, src, key), dtype)
        except ValueError:
            if key not in tied:
                raise
    model.load_state_dict(rest, strict=False, assign=True)
    del rest
    if tied:
        model.tie_weights()
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
                if p is not None and p.device.type == "meta" and n in model.state_dict()]
    if leftover:
        raise ValueError(f"the checkpoint at {src.directory} does not provide {leftover[:5]}")
    mark_only_lora_trainable(model)
    model.eval()


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that share a parameter with an earlier key (tied embeddings)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied


def available_host_memory() -> int:
    """Bytes of host memory available to a new allocation (``MemAvailable``; total RAM where unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
