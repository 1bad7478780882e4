"""The two passes of streaming quantization over the transformer blocks, and the plan between them.

1. :func:`pass1_codebooks` (a method that plans): per target layer ``lowra.pipeline.layer_table``
   → its codebooks and its error table ``[out, K]`` (K-FAC / Fisher tables read the block's
   calibration statistics);
2. :func:`plan_rows`: one ``assign_precision`` over the rows of the whole model
   (``lowra.pipeline.solve_plan``, the in-memory path's own call);
3. :func:`pass2_quantize`: per layer ``lowra.layer_quantization.quantize_layer`` (the quantizer with the
   fixed plan and codebooks, the adapter init, the ``LowRALinear`` that holds codes and adapters).

Each finished block (the plan: once) is written to the partial directory
(:mod:`lowra.streaming.partial`) and skipped when a rerun finds it there.  One target layer's
full-precision weight is held at a time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from lowra.layer_quantization import quantize_layer
from lowra.pipeline import Calibration, Settings, layer_table, row_costs, solve_plan
from lowra.progress import Ticker
from lowra.report import LayerReport, QuantizationReport, jsonable
from lowra.streaming.partial import PartialDir, read_header
from lowra.weights import ShardSource

__all__ = ["StreamJob", "pass1_codebooks", "pass2_quantize", "plan_rows"]


@dataclass
class StreamJob:
    """One ``quantize_pretrained`` run: its settings, weight source, targets and partial directory.

    ``names``: the target layers in module order; ``shapes``: ``(out, in)`` each; ``blocks``:
    consecutive targets grouped by transformer block; ``resumed``: blocks of each pass taken from
    the partial directory.
    """

    settings: Settings
    source: ShardSource
    names: list[str]
    shapes: dict[str, tuple[int, int]]
    blocks: list[tuple[str, list[str]]]
    partial: PartialDir
    resumed: dict[str, int]


def pass1_codebooks(job: StreamJob, calib: Calibration) -> tuple[dict[str, dict[int, torch.Tensor]],
                                                                 dict[str, torch.Tensor]]:
    """Pass 1, block by block (the in-memory stage's own ``layer_table``, statistics from ``calib``):
    ``({layer: {bits: codebook [out, 2**bits]}}, {layer: error table [out, K]})``."""
    settings, partial = job.settings, job.partial
    codebooks: dict[str, dict[int, torch.Tensor]] = {}
    errors: dict[str, torch.Tensor] = {}
    ticker = Ticker("pass 1 (codebooks)", len(job.names), settings.progress)
    for i, (_, block_names) in enumerate(job.blocks):
        if partial.done("pass1", i):
            tensors, _ = partial.read("pass1", i)
            job.resumed["pass1"] += 1
            for _ in block_names:
                ticker.tick()
        else:
            t0 = time.perf_counter()
            tensors = {}
            for name in block_names:
                w = job.source.weight(name)
                tables, error = layer_table(name, w, settings, calib)
                for b, c in tables.items():
                    tensors[f"{name}/codebook.{b}"] = c
                tensors[f"{name}/error"] = error
                del w
                ticker.tick()
            partial.write("pass1", i, tensors, {"time_s": time.perf_counter() - t0})
        for name in block_names:
            codebooks[name] = {b: tensors[f"{name}/codebook.{b}"] for b in settings.candidates}
            errors[name] = tensors[f"{name}/error"]
    return codebooks, errors


def plan_rows(job: StreamJob, errors: dict[str, torch.Tensor], report: QuantizationReport) -> dict[str, torch.Tensor]:
    """The plan over the whole model's table: int64 bits ``[out]`` per layer (solve info in ``report.plan``)."""
    settings, partial, names, shapes = job.settings, job.partial, job.names, job.shapes
    if partial.state["plan"] and partial.file("plan").is_file():
        tensors, meta = partial.read("plan")
        report.plan = meta["plan"]
        return {n: tensors[n].to(torch.int64) for n in names}
    params = [torch.full((shapes[n][0],), shapes[n][1], dtype=torch.int64) for n in names]
    effective = settings.budget_kind == "effective"
    costs = [row_costs(shapes[n][0], shapes[n][1], settings) for n in names] if effective else None
    try:
        per_layer, report.plan = solve_plan([errors[n] for n in names], params, settings.bits, settings.candidates,
                                            settings.budget_scope, dict(settings.plan_options), costs)
    except ValueError as exc:
        if not effective:
            raise
        raise ValueError(f"quant.budget_kind=effective, bits={settings.bits}: {exc}") from exc
    layer_bits = dict(zip(names, per_layer))
    report.plan = jsonable(report.plan)
    partial.write("plan", None, {n: b.to(torch.int8) for n, b in layer_bits.items()}, {"plan": report.plan})
    return layer_bits


def pass2_quantize(job: StreamJob, layer_bits: dict[str, torch.Tensor], codebooks: dict[str, dict[int, torch.Tensor]],
                   calib: Calibration, times: dict[str, float]) -> dict[str, LayerReport]:
    """Pass 2, one block file at a time: the in-memory stage's own ``quantize_layer`` (quantize + pack,
    adapter init with the layer's statistics from ``calib``), its ``LowRALinear`` state written.
    Quantizer and init seconds are added to ``times``; returns each layer's ``LayerReport`` (read
    back from the block files of a resumed run)."""
    settings, partial = job.settings, job.partial
    layer_reports: dict[str, LayerReport] = {}
    ticker = Ticker("pass 2 (quantize)", len(job.names), settings.progress)
    for i, (_, block_names) in enumerate(job.blocks):
        if partial.done("pass2", i):
            meta = read_header(partial.file("pass2", i))
            job.resumed["pass2"] += 1
            for _ in block_names:
                ticker.tick()
        else:
            tensors, meta = {}, {"layers": {}, "times": {"quantize_s": 0.0, "loftq_s": 0.0}}
            for name in block_names:
                w = job.source.weight(name)
                job.source.bias(name)  # checked finite; the assembled model reads it from the source
                new, lr = quantize_layer(name, w, None, settings, layer_bits.get(name), codebooks.pop(name, None),
                                         calib, meta["times"])
                for k, t in new.qweight.state_dict().items():
                    tensors[f"{name}/{k}"] = t
                if new.rank:
                    tensors[f"{name}.lora_A"] = new.lora_A.detach()
                    tensors[f"{name}.lora_B"] = new.lora_B.detach()
                meta["layers"][name] = {"quantized": new.qweight.metadata(), "report": asdict(lr)}
                del w, new
                ticker.tick()
            partial.write("pass2", i, tensors, meta)
            del tensors
        times["quantize_s"] += meta["times"]["quantize_s"]
        times["loftq_s"] += meta["times"]["loftq_s"]
        for name in block_names:
            r = dict(meta["layers"][name]["report"])
            r["shape"] = tuple(r["shape"])
            r["bits_histogram"] = {int(k): int(v) for k, v in r["bits_histogram"].items()}
            layer_reports[name] = LayerReport(**r)
    codebooks.clear()
    return layer_reports
