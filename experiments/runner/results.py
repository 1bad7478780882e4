"""What a run reports: the ``results.json`` record of the runner's stages, and the metrics it logs.

:func:`stage_results` is the record :func:`experiments.runner.run._run_stages` returns (metrics before and
after fine-tuning, bits, the ``LowRAConfig``, training, memory, lm-eval); :func:`finish_results`
adds what the run as a whole knows (strategy, peak memory, wall time, versions, config) before it
is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from experiments.runner.distributed import DistContext
from experiments.runner.logging_utils import RunLogger, peak_memory_bytes, versions
from experiments.runner.resume import RunState
from experiments.runner.setup import lowra_config
from experiments.runner.train import TrainResult


def bits_by_layer_type(report: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Rows per bit-width pooled by layer type (``q_proj`` …) from a quantization report dict."""
    out: dict[str, dict[str, int]] = {}
    for layer in report.get("layers", []):
        kind = layer["name"].rsplit(".", 1)[-1]
        hist = out.setdefault(kind, {})
        for b, n in layer.get("bits_histogram", {}).items():
            hist[str(b)] = hist.get(str(b), 0) + int(n)
    return out


def metric_prefix(cfg: Any) -> str:
    return "ppl" if cfg.data.task == "lm" else "rouge"


def metric_value(metrics: dict[str, Any] | None) -> Any:
    """The number (ppl) or ROUGE dict stored in results.json for one evaluation."""
    if metrics is None:
        return None
    return metrics["ppl"] if "ppl" in metrics else {k: metrics[k] for k in ("rouge1", "rouge2", "rougeL")}


def _log_metric(logger: RunLogger, key: str, value: Any) -> None:
    """``eval/<key>`` (a number) or ``eval/<key>/<rouge>`` (a ROUGE dict); None is not logged."""
    if isinstance(value, dict):
        logger.log({f"eval/{key}/{k}": v for k, v in value.items()})
    elif value is not None:
        logger.log({f"eval/{key}": value})


def stage_results(cfg: Any, prefix: str, report: dict[str, Any], state: RunState, finetuned: Any,
                  result: TrainResult, n_trainable: int, data: Any, memory: dict[str, Any] | None,
                  harness: dict[str, Any] | None) -> dict[str, Any]:
    """The results of the stages: ``report`` is the quantization report dict, ``state`` the run's
    stored stage results, ``result`` the fine-tuning's, ``memory`` the memory report (or None)."""
    return {
        "method": cfg.quant.name,
        "quant_method": cfg.quant.method,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "metric": "perplexity" if prefix == "ppl" else "rouge",
        "bits_target": float(cfg.quant.bits),
        "bits_nominal": report.get("bits_nominal"),
        "bits_effective": report.get("bits_effective"),
        "error_table": report.get("error_table"),
        "init": report.get("init"),
        "loftq_iters": report.get("loftq_iters"),  # what the init ran (quant.low_bits_init may change it)
        "init_codebooks": report.get("init_codebooks"),
        "budget_kind": report.get("budget_kind", "nominal"),
        "lowra_config": lowra_config(cfg).to_dict(),  # every quantization + adapter option (LowRAConfig)
        f"{prefix}_fp": state.get(f"{prefix}_fp"),
        f"{prefix}_quantized": state.get(f"{prefix}_quantized"),
        f"{prefix}_loftq": state.get(f"{prefix}_loftq"),
        f"{prefix}_finetuned": finetuned,
        "optimizer": result.optimizer,
        "train_steps": result.steps,
        "train_loss_final": result.loss_final,
        "train_losses": result.losses,
        "resumed_from_step": result.resumed_from,
        "quantize_time_s": state.get("quantize_time_s"),
        "train_time_s": result.time_s,
        "distill": result.distill,  # train.distill: weight, temperature, the teacher's load/forward costs
        "rank": int(cfg.lora.rank),
        "alpha": float(cfg.lora.alpha),
        "seed": int(cfg.seed),
        "trainable_params": n_trainable,
        "bits_by_layer_type": bits_by_layer_type(report),
        "eval": {"max_tokens": cfg.eval.max_tokens, "window": cfg.eval.window, "stride": cfg.eval.stride,
                 "num_samples": cfg.eval.num_samples},
        "data_sources": data.sources,
        "memory": memory,
        "harness": harness,
    }


def finish_results(results: dict[str, Any], dist_ctx: DistContext, state: RunState, device: torch.device,
                   run_dir: Path, config: Any) -> dict[str, Any]:
    """``results`` plus strategy, world size, peak memory (device, or the process's host peak over the
    stages), wall time of every session, device name, versions, run directory and config (in place)."""
    peak = peak_memory_bytes(device)
    if device.type != "cuda" and (results.get("memory") or {}).get("stages"):  # per-stage resets lower ru_maxrss
        peak = max(peak, int(results["memory"]["stages"]["process_peak_rss_bytes"]))
    results.update(
        strategy=dist_ctx.strategy,
        world_size=dist_ctx.world_size,
        peak_memory_bytes=peak,
        wall_time_s=state.wall_time_s(),  # every session, a killed one up to its last checkpoint
        device=str(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu",
        versions=versions(),
        run_dir=str(run_dir),
        config=config,
    )
    return results
