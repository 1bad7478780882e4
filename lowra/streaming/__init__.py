"""Quantize a model larger than memory: stream a sharded safetensors checkpoint block by block.

``quantize_pretrained(model_dir, out_dir, bits, ...)`` produces the same quantized model as
loading the full-precision model and calling ``lowra.quantize_model`` (same options: the codes,
codebooks, scales and plan are identical bit for bit), without ever holding the full-precision
model. It reads the checkpoint's safetensors shards memory-mapped (``safetensors.safe_open``), one
tensor at a time, and works through the transformer blocks in module order:

1. **pass 1** (``method="lowra"`` with a plan): per target layer ``learn_codebooks`` → its codebooks
   and its error table ``[out, K]`` (``lowra.error_tables.row_error_table``); each block's results
   are written to the partial directory as they finish;
2. **plan**: one ``assign_precision`` over the rows of the whole model (``lowra.stages._solve_plan``,
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

Modules, one a stage: :mod:`~lowra.streaming.source` (shards, skeleton, blocks),
:mod:`~lowra.streaming.options` (the ``LowRAConfig``: the same as ``quantize_model``'s, recorded in
the checkpoint as ``lowra_config``; what cannot stream), :mod:`~lowra.streaming.passes` (pass 1,
plan, pass 2), :mod:`~lowra.streaming.partial` (the resumable progress state),
:mod:`~lowra.streaming.assemble` and :mod:`~lowra.streaming.memory` (``PeakMemory``).

Not streamable: error tables and adapter inits that need data through the whole model
(``error=fisher|kfac|measured``, ``init="calibrated"``, ``fisher_codebooks``, quantizers that need
calibration Hessians such as OPTQ) and ``method="none"``: they raise a ValueError that says to use
``quantize_model`` on the model in memory.

``PeakMemory`` measures each stage's peak host RSS (``/proc/self/status`` VmHWM, reset per stage
through ``/proc/self/clear_refs``) and peak CUDA memory; ``StreamResult.stages`` records them.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowra.layers import DEFAULT_SKIP_MODULES, find_target_linears
from lowra.report import QuantizationReport
from lowra.stages import Calibration, init_for_plan, new_report
from lowra.streaming.assemble import _assemble
from lowra.streaming.memory import PeakMemory, available_host_memory
from lowra.streaming.memory import current_rss as current_rss
from lowra.streaming.memory import peak_rss as peak_rss
from lowra.streaming.memory import reset_peak_rss as reset_peak_rss
from lowra.streaming.options import _UNSTREAMABLE, fingerprint, stream_settings
from lowra.streaming.partial import PARTIAL_SUFFIX, _Partial
from lowra.streaming.passes import StreamJob, pass1_codebooks, pass2_quantize, plan_rows
from lowra.streaming.source import _blocks, _skeleton, _Source, _source_key, checkpoint_bytes, source_checkpoint

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
    init_codebooks: str = "fixed",
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
    t_start = time.perf_counter()
    peaks = PeakMemory()
    if calibration is not None:
        raise ValueError(f"quantize_pretrained does not use calibration data: {_UNSTREAMABLE}")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype (e.g. 'bfloat16'), got {dtype!r}")
        dtype = getattr(torch, dtype)
    device = torch.device(device)
    # the LowRAConfig of quantize_model's keyword form: the same validation, the same resolved settings
    s = stream_settings(dict(
        bits=bits, method=method, rank=rank, alpha=alpha, target_modules=target_modules, loftq_iters=loftq_iters,
        group_size=group_size, dropout=dropout, double_quant=double_quant, candidates=candidates,
        budget_scope=budget_scope, use_plan=use_plan, skip_modules=tuple(skip_modules),
        codebook_iters=codebook_iters, weight_power=weight_power, plan_options=dict(plan_options or {}),
        adapter_dtype=adapter_dtype, codebook=codebook, plan=plan, error=error, fisher_codebooks=fisher_codebooks,
        init=init, init_damp=init_damp, init_codebooks=init_codebooks, budget_kind=budget_kind, **quant_options,
    ), backend=backend, progress=progress)
    out_dir = Path(out_dir)

    with peaks.stage("setup"):
        directory = source_checkpoint(model_dir)
        src = _Source(directory)
        source_bytes = sum((directory / n).stat().st_size for n in src.files())
        model = _skeleton(directory, arch, dtype, trust_remote_code)
        targets = find_target_linears(model, s.target_modules, s.skip_modules)
        names = [n for n, _ in targets]
        for n, m in targets:
            if s.rank > min(m.out_features, m.in_features):
                raise ValueError(f"layer {n!r} {(m.out_features, m.in_features)} is too small for rank {s.rank}")
        has_bias = {n: m.bias is not None for n, m in targets}
        job = StreamJob(
            s=s, src=src, dtype=dtype, device=device, names=names,
            shapes={n: (m.out_features, m.in_features) for n, m in targets}, has_bias=has_bias,
            weight_keys={n: _source_key(model, src, f"{n}.weight") for n in names},
            bias_keys={n: _source_key(model, src, f"{n}.bias") for n in names if has_bias[n]},
            blocks=_blocks(names),
            partial=_Partial(out_dir.parent / (out_dir.name + PARTIAL_SUFFIX),
                             fingerprint(s, {"dtype": dtype, "arch": arch, "backend": backend}, src, names), resume),
            resumed={"pass1": 0, "pass2": 0},
        )
    report = new_report(s, targets, Calibration())
    times = report.times

    # ---- pass 1: codebooks + error tables, block by block; the plan on the whole model's table
    layer_bits: dict[str, torch.Tensor] = {}
    codebooks: dict[str, dict[int, torch.Tensor]] = {}
    if s.with_plan:
        with peaks.stage("pass1_codebooks"):
            codebooks, errors = pass1_codebooks(job)
        times["codebooks_s"] = peaks.stages["pass1_codebooks"]["time_s"]
        with peaks.stage("plan"):
            layer_bits = plan_rows(job, errors, report)
            del errors
        times["plan_s"] = peaks.stages["plan"]["time_s"]

    # ---- pass 2: quantize + LoftQ per layer, one block file at a time
    job.s = s = init_for_plan(s, layer_bits, {n: shape[1] for n, shape in job.shapes.items()}, report)
    with peaks.stage("pass2_quantize"):
        layer_reports = pass2_quantize(job, layer_bits, codebooks, times, loftq_init_fn)

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
        _assemble(model, src, job.partial, job.blocks, has_bias, job.bias_keys, dtype, job.module_kw)
        times["total_s"] = time.perf_counter() - t_start
        model.lowra_report = report
        model.lowra_config = s.config
        from lowra.checkpoint import save_quantized

        save_quantized(model, out_dir, report=report, source_model=str(model_dir))
        del model
    report.times["total_s"] = time.perf_counter() - t_start
    shutil.rmtree(job.partial.path, ignore_errors=True)
    return StreamResult(out_dir=out_dir, report=report, stages=peaks.to_dict()["stages"], resumed=job.resumed,
                        source_bytes=source_bytes, peak_resettable=peaks.peak_resettable)


def loftq_init_fn(w: torch.Tensor, quantize_fn: Any, rank: int, alpha: float, iters: int, name: str,
                  damp: float) -> Any:
    """``lowra.loftq.loftq_init`` as the in-memory path calls it (plain LoftQ, no Hessian)."""
    from lowra.loftq import loftq_init

    return loftq_init(w, quantize_fn, rank, alpha, iters=iters, name=f"layer {name!r}", hessian=None, damp=damp)
