"""Quantize a model larger than memory: stream a sharded safetensors checkpoint block by block.

``quantize_pretrained(model_dir, out_dir, config, calibration=...)`` produces the same quantized model
as loading the full-precision model and calling ``lowra.quantize_model(model, config,
calibration=...)`` (the codes, codebooks, scales, plan and adapters are identical bit for bit),
without ever holding the full-precision model. The weights come from a
:class:`lowra.weights.ShardSource` (the model is a meta-device skeleton; a tensor is read from its
shard when a stage asks for it) and go through the in-memory path's own stages:

1. **calibration** (when the method needs statistics): block by block (:mod:`lowra.blockwise`), one
   decoder block materialized at a time, each block's statistics written to the partial directory;
2. **pass 1** (a method that plans): per target layer ``lowra.pipeline.layer_table`` → its codebooks and
   error table ``[out, K]``; each block's results written as they finish;
3. **plan**: one ``assign_precision`` over the rows of the whole model (``lowra.pipeline.solve_plan``);
4. **pass 2**: per layer ``lowra.layer_quantization.quantize_layer`` (quantizer with the fixed plan and
   codebooks, adapter init, the ``LowRALinear`` that holds codes and adapters); each finished block
   written as one safetensors file;
5. **assemble**: the quantized model built on the meta device, its quantized layers filled from the
   block files and its other tensors (embeddings, norms, ``lm_head``) from the source, and saved
   with ``lowra.save_quantized`` (so ``lowra.load_quantized`` reads it like any other save).

Memory: full-precision weights of ONE target layer (pass 1 and 2) or one decoder block
(calibration) at a time, one block's statistics, one calibration chunk's activations; the block
boundaries of the calibration sweeps are spilled to disk.

Resume: the partial directory ``<out_dir>.partial/`` holds ``progress.json`` (the finished blocks of
each pass, whether calibration finished) and the block files (each written atomically). A rerun with
the same source, config and calibration windows skips every finished block; another is refused
(``resume=False`` starts over). The partial directory is removed once the final checkpoint is saved.

Modules, one a stage: :mod:`~lowra.streaming.source` (shards, skeleton, blocks),
:mod:`~lowra.streaming.options` (the resolved settings, what cannot stream, the resume fingerprint),
:mod:`~lowra.streaming.passes` (pass 1, plan, pass 2), :mod:`~lowra.streaming.partial` (the resumable
progress state), :mod:`~lowra.streaming.assemble` and :mod:`~lowra.streaming.peak_memory` (``PeakMemory``).

Not streamable (``lowra.methods.unstreamable``): ``method="none"`` (nothing to quantize) and
``error="measured"`` (it measures the whole model's loss per layer and width).

``PeakMemory`` measures each stage's peak host RSS (``/proc/self/status`` VmHWM, reset per stage
through ``/proc/self/clear_refs``) and peak CUDA memory; ``StreamResult.stages`` records them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowra.config import LowRAConfig, config_from_arguments
from lowra.layer_quantization import module_kwargs
from lowra.model_layers import find_target_linears
from lowra.pipeline import Calibration, Settings, calibrate, calibration_from_store, init_for_plan, new_report
from lowra.report import QuantizationReport
from lowra.streaming.assemble import assemble_model
from lowra.streaming.options import fingerprint, stream_settings
from lowra.streaming.partial import PARTIAL_SUFFIX, PartialDir
from lowra.streaming.passes import StreamJob, pass1_codebooks, pass2_quantize, plan_rows
from lowra.streaming.peak_memory import PeakMemory, available_host_memory
from lowra.streaming.peak_memory import current_rss as current_rss
from lowra.streaming.peak_memory import peak_rss as peak_rss
from lowra.streaming.peak_memory import reset_peak_rss as reset_peak_rss
from lowra.streaming.source import ShardReader, checkpoint_bytes, group_blocks, skeleton, source_checkpoint
from lowra.weights import ShardSource

__all__ = [
    "PeakMemory",
    "available_host_memory",
    "StreamResult",
    "checkpoint_bytes",
    "quantize_pretrained",
    "source_checkpoint",
]


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


# ---------------------------------------------------------------------------------- main entry
def quantize_pretrained(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: LowRAConfig | Mapping[str, Any] | float | None = None,
    *,
    calibration: torch.Tensor | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    arch: str = "causal_lm",
    resume: bool = True,
    progress: bool = True,
    **options: Any,
) -> StreamResult:
    """Quantize the checkpoint in ``model_dir`` into ``out_dir`` without loading the full model.

    Args:
        model_dir: a directory with ``config.json`` and safetensors shards (``model.safetensors`` or
            an index), or a Hub id (resolved through the local cache, see ``source_checkpoint``).
        out_dir: where the quantized model is saved (``lowra.save_quantized``; read it back with
            ``lowra.load_quantized``). ``<out_dir>.partial/`` holds the work of an unfinished run.
        config: the same as ``lowra.quantize_model``'s: a ``LowRAConfig`` (None: ``LowRAConfig()``,
            the runner's default), its ``to_dict()`` form or the budget ``bits``; ``options`` are
            its fields (over ``config``) or the quantizer's options, as ``quantize_model(**options)``
            takes them, plus ``backend`` (kernels) and ``trust_remote_code`` (building the skeleton).
            The codes, plan and adapters are identical to that path's for the same model and config.
        calibration: int64 token windows ``[samples, seq_len]`` for what needs data (K-FAC / Fisher
            tables, the calibrated init, OPTQ), run through the model block by block
            (:mod:`lowra.blockwise`).
        dtype: dtype the weights are read in (as ``from_pretrained(dtype=...)``; None: as stored).
            The in-memory path quantizes ``linear.weight`` in the model's dtype, so match them.
        device: where each block is calibrated and each layer quantized (``"cuda"``: one at a time on the GPU).
        arch: ``"causal_lm"`` or ``"seq2seq"`` (the Auto class the skeleton is built from).
        resume: continue an interrupted run found in ``<out_dir>.partial/`` (same source, options and
            calibration windows); False discards it.
    Returns:
        A ``StreamResult`` (report, per-stage time and peak memory, resumed block counts).
    Raises:
        ValueError: an unstreamable setting (``method="none"``, ``error="measured"``, a model
            without decoder blocks when statistics are needed), a source without safetensors, a
            target missing from the checkpoint, NaN/Inf weights, or any option ``quantize_model`` refuses.
    """
    t_start = time.perf_counter()
    peaks = PeakMemory()
    backend = str(options.pop("backend", "auto"))
    trust_remote_code = bool(options.pop("trust_remote_code", False))
    dtype = _dtype(dtype)
    device = torch.device(device)
    config, runtime = config_from_arguments(config, options)
    settings = stream_settings(config, runtime, backend=backend, progress=progress)
    out_dir = Path(out_dir)
    with peaks.stage("setup"):
        job, model, targets, source_bytes = _setup(model_dir, out_dir, settings, calibration, dtype, device, arch,
                                                   trust_remote_code, resume, backend)
    calib = Calibration()
    if settings.needs.any:
        with peaks.stage("calibration"):
            calib = _calibrate(job, model, targets, calibration)
    report = new_report(settings, targets, calib)
    job.settings = settings = _passes(job, calib, report, peaks)

    # ---- assemble the quantized model and save it through the public format
    with peaks.stage("assemble_save"):
        assemble_model(model, job.source, job.partial, job.blocks, module_kwargs(settings))
        report.times["total_s"] = time.perf_counter() - t_start
        model.lowra_report = report
        model.lowra_config = settings.config
        from lowra.checkpoint import save_quantized

        save_quantized(model, out_dir, report=report, source_model=str(model_dir))
        del model
    report.times["total_s"] = time.perf_counter() - t_start
    shutil.rmtree(job.partial.path, ignore_errors=True)
    return StreamResult(out_dir=out_dir, report=report, stages=peaks.to_dict()["stages"], resumed=job.resumed,
                        source_bytes=source_bytes, peak_resettable=peaks.peak_resettable)


def _passes(job: StreamJob, calib: Calibration, report: QuantizationReport, peaks: PeakMemory) -> Settings:
    """Pass 1 (codebooks + error tables) and the plan when the method plans, then pass 2 (quantize +
    adapter init), block by block; the report gets their times and the layers' totals.  Returns the
    settings the init ran with (``init_for_plan``)."""
    settings, times = job.settings, report.times
    layer_bits: dict[str, torch.Tensor] = {}
    codebooks: dict[str, dict[int, torch.Tensor]] = {}
    if settings.with_plan:
        with peaks.stage("pass1_codebooks"):
            codebooks, errors = pass1_codebooks(job, calib)
        times["codebooks_s"] = peaks.stages["pass1_codebooks"]["time_s"]
        with peaks.stage("plan"):
            layer_bits = plan_rows(job, errors, report)
            del errors
        times["plan_s"] = peaks.stages["plan"]["time_s"]
    in_features = {n: shape[1] for n, shape in job.shapes.items()}
    job.settings = settings = init_for_plan(settings, layer_bits, in_features, report)
    with peaks.stage("pass2_quantize"):
        layer_reports = pass2_quantize(job, layer_bits, codebooks, calib, times)
    _layer_totals(report, [layer_reports[n] for n in job.names])
    return settings


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype (e.g. 'bfloat16'), got {dtype!r}")
        return getattr(torch, dtype)
    return dtype


def _setup(model_dir: Any, out_dir: Path, settings: Settings, calibration: Any, dtype: torch.dtype | None,
           device: torch.device, arch: str, trust_remote_code: bool, resume: bool,
           backend: str) -> tuple[StreamJob, torch.nn.Module, list[tuple[str, torch.nn.Module]], int]:
    """The skeleton, its targets (checked against the rank), the weight source and the partial directory."""
    directory = source_checkpoint(model_dir)
    reader = ShardReader(directory)
    source_bytes = sum((directory / n).stat().st_size for n in reader.files())
    model = skeleton(directory, arch, dtype, trust_remote_code)
    targets = find_target_linears(model, settings.target_modules, settings.skip_modules)
    names = [n for n, _ in targets]
    for n, m in targets:
        if settings.rank > min(m.out_features, m.in_features):
            raise ValueError(f"layer {n!r} {(m.out_features, m.in_features)} is too small for rank {settings.rank}")
    extra = {"dtype": dtype, "arch": arch, "backend": backend, "calibration": _digest(calibration)}
    partial = PartialDir(out_dir.parent / (out_dir.name + PARTIAL_SUFFIX), fingerprint(settings, extra, reader, names),
                         resume)
    job = StreamJob(settings=settings, source=ShardSource(model, reader, dtype, device), names=names,
                    shapes={n: (m.out_features, m.in_features) for n, m in targets}, blocks=group_blocks(names),
                    partial=partial, resumed={"pass1": 0, "pass2": 0, "calibration": 0})
    return job, model, targets, source_bytes


def _digest(calibration: Any) -> str | None:
    if calibration is None:
        return None
    t = torch.as_tensor(calibration).contiguous()
    return hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest() + str(tuple(t.shape))


def _calibrate(job: StreamJob, model: torch.nn.Module, targets: list[tuple[str, torch.nn.Module]],
               calibration: Any) -> Calibration:
    """Block-wise calibration into the partial directory (``calibration/``, kept until the run ends;
    a resumed run whose calibration had finished reuses it)."""
    from lowra.blockwise import StatStore, block_layout

    store = StatStore(job.partial.path / "calibration")
    if job.partial.state.get("calibration"):
        layout = block_layout(model, job.names)
        if all(store.has(i) for i in range(len(layout.layers))):
            job.resumed["calibration"] = 1
            return calibration_from_store(store, layout)
    calib = calibrate(model, targets, job.settings, calibration, source=job.source, store=store)
    job.partial.mark("calibration")
    return calib


def _layer_totals(report: QuantizationReport, reports: list[Any]) -> None:
    total = report.num_params
    sizes = [lr.shape[0] * lr.shape[1] for lr in reports]
    report.layers = reports
    report.bits_nominal = sum(lr.nominal_bits * n for lr, n in zip(reports, sizes)) / total
    report.bits_effective = sum(lr.effective_bits * n for lr, n in zip(reports, sizes)) / total
    report.total_sse_quant = sum(lr.sse_quant for lr in reports)
    report.total_sse = sum(lr.sse_loftq for lr in reports)
