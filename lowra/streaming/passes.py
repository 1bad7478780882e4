"""The two passes of streaming quantization over the transformer blocks, and the plan between them.

1. :func:`pass1_codebooks` (``method="lowra"`` with a plan): per target layer ``learn_codebooks``
   → its codebooks and its error table ``[out, K]`` (``lowra.error_tables.row_error_table``);
2. :func:`plan_rows`: one ``assign_precision`` over the rows of the whole model
   (``lowra.stages._solve_plan``, the in-memory path's own call);
3. :func:`pass2_quantize`: per layer the quantizer with the fixed plan and codebooks, the adapter
   init (LoftQ) and the ``LowRALinear`` that holds the codes and adapters.

Each finished block (the plan: once) is written to the partial directory
(:mod:`lowra.streaming.partial`) and skipped when a rerun finds it there.  One target layer's
full-precision weight is held at a time.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lowra.nn import LowRALinear
from lowra.report import LayerReport, QuantizationReport
from lowra.stages import Settings
from lowra.streaming.partial import _Partial, _read_header
from lowra.streaming.source import _Source
from lowra.validation import check_weight

__all__ = ["StreamJob", "pass1_codebooks", "pass2_quantize", "plan_rows"]


@dataclass
class StreamJob:
    """One ``quantize_pretrained`` run: its settings, source, targets and partial directory.

    ``names``: the target layers in module order; ``shapes``: ``(out, in)`` each; ``blocks``:
    consecutive targets grouped by transformer block; ``weight_keys`` / ``bias_keys``: their
    tensors' names in the checkpoint; ``resumed``: blocks of each pass taken from the partial
    directory.
    """

    s: Settings
    src: _Source
    dtype: torch.dtype | None
    device: torch.device
    names: list[str]
    shapes: dict[str, tuple[int, int]]
    has_bias: dict[str, bool]
    weight_keys: dict[str, str]
    bias_keys: dict[str, str]
    blocks: list[tuple[str, list[str]]]
    partial: _Partial
    resumed: dict[str, int]

    def load_weight(self, name: str) -> torch.Tensor:
        """The layer's weight ``[out, in]`` on the work device, checked finite and of the config's shape."""
        w = self.src.load(self.weight_keys[name], self.dtype).to(self.device)
        check_weight(w, f"layer {name!r} weight")
        if tuple(w.shape) != self.shapes[name]:
            raise ValueError(f"layer {name!r}: the checkpoint's weight has shape {tuple(w.shape)}, "
                             f"the config builds {self.shapes[name]}")
        return w

    @property
    def module_kw(self) -> dict[str, Any]:
        """``LowRALinear`` keyword arguments of every quantized layer (as the in-memory path's)."""
        s = self.s
        return dict(rank=s.rank, alpha=s.alpha, dropout=s.dropout, adapter_dtype=s.adapter_dtype, backend=s.backend)


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="block", leave=False)


def pass1_codebooks(job: StreamJob) -> tuple[dict[str, dict[int, torch.Tensor]], dict[str, torch.Tensor]]:
    """Pass 1, block by block: ``({layer: {bits: codebook [out, 2**bits]}}, {layer: error table [out, K]})``."""
    from lowra.codebook import learn_codebooks
    from lowra.error_tables import row_error_table

    s, partial = job.s, job.partial
    codebooks: dict[str, dict[int, torch.Tensor]] = {}
    errors: dict[str, torch.Tensor] = {}
    with _bar(len(job.blocks), "pass 1 (codebooks)", s.progress) as bar:
        for i, (_, block_names) in enumerate(job.blocks):
            if partial.done("pass1", i):
                tensors, _ = partial.read("pass1", i)
                job.resumed["pass1"] += 1
            else:
                t0 = time.perf_counter()
                tensors = {}
                for name in block_names:
                    w = job.load_weight(name)
                    result = learn_codebooks(w, bits=s.candidates, group_size=s.group_size, iters=s.codebook_iters,
                                             weight_power=s.weight_power, double_quant=s.double_quant)
                    for b, c in result.codebooks.items():
                        tensors[f"{name}/codebook.{b}"] = c.cpu()
                    tensors[f"{name}/error"] = row_error_table(s.error, result.error, w).cpu()
                    del w, result
                partial.write("pass1", i, tensors, {"time_s": time.perf_counter() - t0})
            for name in block_names:
                codebooks[name] = {b: tensors[f"{name}/codebook.{b}"] for b in s.candidates}
                errors[name] = tensors[f"{name}/error"]
            if bar is not None:
                bar.update(1)
    return codebooks, errors


def plan_rows(job: StreamJob, errors: dict[str, torch.Tensor], report: QuantizationReport) -> dict[str, torch.Tensor]:
    """The plan over the whole model's table: int64 bits ``[out]`` per layer (solve info in ``report.plan``)."""
    from lowra.format import row_storage_bits
    from lowra.stages import _solve_plan

    s, partial, names, shapes = job.s, job.partial, job.names, job.shapes
    if partial.state["plan"] and partial.file("plan").is_file():
        tensors, meta = partial.read("plan")
        report.plan = meta["plan"]
        return {n: tensors[n].to(torch.int64) for n in names}
    params = [torch.full((shapes[n][0],), shapes[n][1], dtype=torch.int64) for n in names]
    costs = None
    if s.budget_kind == "effective":
        costs = [torch.tensor([row_storage_bits(shapes[n][1], b, s.group_size, s.double_quant)
                               for b in s.candidates], dtype=torch.int64).expand(shapes[n][0], -1)
                 for n in names]
    try:
        per_layer, report.plan = _solve_plan([errors[n] for n in names], params, s.bits, s.candidates,
                                             s.budget_scope, dict(s.plan_options), costs)
    except ValueError as exc:
        if s.budget_kind != "effective":
            raise
        raise ValueError(f"quant.budget_kind=effective, bits={s.bits}: {exc}") from exc
    layer_bits = dict(zip(names, per_layer))
    from lowra.report import _jsonable

    report.plan = _jsonable(report.plan)
    partial.write("plan", None, {n: b.to(torch.int8) for n, b in layer_bits.items()}, {"plan": report.plan})
    return layer_bits


def pass2_quantize(job: StreamJob, layer_bits: dict[str, torch.Tensor], codebooks: dict[str, dict[int, torch.Tensor]],
                   times: dict[str, float], init_fn: Callable[..., Any]) -> dict[str, LayerReport]:
    """Pass 2, one block file at a time: quantize + pack, adapter init, ``LowRALinear`` state.

    ``init_fn(w, quantize_fn, rank, alpha, iters, name, damp)`` is the adapter init
    (``lowra.streaming.loftq_init_fn``); quantizer and init seconds are added to ``times``.
    Returns each layer's ``LayerReport`` (read back from the block files of a resumed run).
    """
    from lowra.quantize_layers import layer_quantizer, timed_init

    s, partial, src = job.s, job.partial, job.src
    module_kw = job.module_kw
    layer_reports: dict[str, LayerReport] = {}
    with _bar(len(job.blocks), "pass 2 (quantize)", s.progress) as bar:
        for i, (_, block_names) in enumerate(job.blocks):
            if partial.done("pass2", i):
                meta = _read_header(partial.file("pass2", i))
                job.resumed["pass2"] += 1
            else:
                tensors, meta = {}, {"layers": {}, "times": {"quantize_s": 0.0, "loftq_s": 0.0}}
                for name in block_names:
                    w = job.load_weight(name)
                    if job.has_bias[name]:
                        check_weight(src.load(job.bias_keys[name], job.dtype)[None], f"layer {name!r} bias")
                    quantize_fn = layer_quantizer(
                        s.method, layer_bits.get(name), codebooks.pop(name, None), s.bits, s.group_size,
                        s.double_quant, s.codebook_iters, s.weight_power, s.backend, w.device,
                        dict(s.quant_options), importance=None, relearn=s.init_codebooks == "relearn",
                    )
                    result, quantize_s, loftq_s = timed_init(
                        quantize_fn,
                        lambda fn, w=w, n=name: init_fn(w, fn, s.rank, s.alpha, s.loftq_iters, n, s.init_damp))
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
                    lr = LayerReport(name, job.shapes[name], {int(k): int(v) for k, v in sorted(hist.items())},
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
    return layer_reports
