"""Experiment runner: ``python -m experiments.run +model=NAME +bits=B [quant=… data=… train.max_steps=N]``.

Stages (one progress bar each, plus a bar over the stages):

1. **load** — validate the config (before anything heavy: :mod:`experiments.runner.config_check`), load
   the tokenizer, the data (:mod:`experiments.runner.data`) and the model; evaluate the full-precision
   model (``ppl_fp`` / ``rouge_fp``, skipped with ``eval.fp=false``).
2. **quantize** — ``lowra.quantize_model`` (codebooks, precision plan, LoftQ) in place; with
   ``quant.stream=true`` (or ``auto`` when the full-precision model would not fit the device)
   ``lowra.quantize_pretrained`` quantizes the checkpoint block by block instead (the model is never
   loaded in full precision; ``ppl_fp`` is then not measured) and the result is loaded back.
3. **evaluate before fine-tuning** — the quantized base alone (adapters disabled:
   ``ppl_quantized``) and with the LoftQ-initialized adapters (``ppl_loftq``; null when
   ``quant.loftq_iters=0`` since B = 0 then).
4. **fine-tune** — the adapters only (:mod:`experiments.runner.train`), checkpoints every
   ``train.checkpoint_every`` steps.
5. **evaluate** — ``ppl_finetuned`` / ``rouge_finetuned``.
6. **save** — ``lowra.save_quantized`` (quantized base + adapters) into ``<run_dir>/model`` and
   ``results.json`` into the run directory (atomic writes).

``resume=true`` with the same ``hydra.run.dir`` continues an interrupted run: finished stages are
read back from ``<run_dir>/state.json``, the quantized model from ``<run_dir>/checkpoint/quantized``
(or re-quantized deterministically when the library cannot save it), the adapters, optimizer,
scheduler and RNG from ``<run_dir>/checkpoint/last.pt``. It refuses a configuration that differs
from the stored one in any result-changing key (``resume_override=true`` continues anyway), and a
finished run is reported as finished (:mod:`experiments.runner.resume`).

Several processes: ``torchrun --nproc_per_node=N -m experiments.run ... train.strategy=ddp|fsdp2``
(:mod:`experiments.runner.distributed`): every rank runs these stages; rank 0 alone logs and writes the
run directory.

Output: one readable summary at the end (:mod:`experiments.runner.summary`; per-step losses only in
``results.json``); progress bars on a terminal, plain periodic lines otherwise
(:mod:`experiments.runner.progress`). A run that fails writes ``<run_dir>/failed.json`` (error, stage,
whether it can be resumed); one that fails before anything resumable exists also removes its
half-made outputs. The W&B run is created only when the first metric is logged and is marked
failed (exit code 1) when the run fails.

Modules: :mod:`experiments.runner.setup` (config → device, tokenizer, model, ``LowRAConfig`` and the
quantizer's arguments; re-exported here), this one (the stages) and :mod:`experiments.runner.results`
(the ``results.json`` record).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from experiments.eval.evaluate import evaluate
from experiments.eval.harness import plan_harness, run_harness
from experiments.runner import resume as resume_guard
from experiments.runner.config_check import CONF_DIR, BudgetError, ConfigError, check_config, resolve_path
from experiments.runner.data import DataUnavailableError, LMData, load_data, pack_blocks
from experiments.runner.distill import distill_options, load_teacher
from experiments.runner.distributed import (
    DistContext,
    RankBatches,
    check_same_on_all_ranks,
    gathered,
    init_distributed,
    scratch_dir,
    wrap_for_training,
)
from experiments.runner.logging_utils import RunLogger, atomic_write_json, make_logger
from experiments.runner.output_check import output_error
from experiments.runner.progress import is_terminal, progress_bar, quiet_library_bars
from experiments.runner.results import _log_metric, finish_results, metric_prefix, metric_value, stage_results
from experiments.runner.resume import RunState
from experiments.runner.setup import (
    ModelUnavailableError,
    adapters_disabled,
    apply_checkpointing,
    calibration_kwargs,
    load_model,
    load_tokenizer,
    lowra_config,
    model_location,
    needs_calibration,
    pick_device,
    stream_kwargs,
    train_base_tables,
    trainable_parameters,
    use_streaming,
)
from experiments.runner.summary import run_summary
from experiments.runner.train import LMBatches, PairBatches, TrainOptions, TrainResult, resolve_optimizer, train

__all__ = ["STAGES", "main", "run"]

log = logging.getLogger("experiments.run")

STAGES = ("load", "quantize", "evaluate (before fine-tuning)", "fine-tune", "evaluate", "save")
STATE_FILE = resume_guard.STATE_FILE
RESULTS_FILE = resume_guard.RESULTS_FILE
FAILED_FILE = resume_guard.FAILED_FILE

# -------------------------------------------------------------------------------------------- run


def run(cfg: DictConfig, run_dir: Path, group: str | None = None, sweep: bool = False) -> dict[str, Any]:
    """Run the whole experiment described by ``cfg`` in ``run_dir``; returns the results dict.

    ``sweep``: the run is one job of a multirun (a budget the method ignores is then allowed).
    """
    check_config(cfg, ignored_budget_ok=sweep)
    OmegaConf.resolve(cfg)
    # torchrun (train.strategy=ddp|fsdp2): the process group first; rank 0 alone writes run outputs
    dist_ctx = init_distributed(str(cfg.train.get("strategy", "single")), pick_device(str(cfg.device)),
                                float(cfg.train.get("dist_timeout_s", 600)))
    try:
        if not dist_ctx.is_main:  # rank 0 prepares the run directory first (its barrier: _run_prepared)
            dist_ctx.barrier()
        with scratch_dir(dist_ctx, Path(run_dir)) as own_dir:
            return _run_prepared(cfg, Path(run_dir), own_dir, group, dist_ctx)
    finally:
        dist_ctx.shutdown()


def _run_prepared(cfg: DictConfig, run_dir: Path, own_dir: Path, group: str | None, dist_ctx: DistContext,
                  ) -> dict[str, Any]:
    """``run`` after the process group exists; ``own_dir`` is where this rank writes its bookkeeping
    (``run_dir`` on rank 0, a private scratch copy on the other ranks)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = bool(cfg.resume)
    config = OmegaConf.to_container(cfg, resolve=True)
    # rank 0 decides whether the directory may be used; the other ranks get here after it has (its barrier)
    # and see the state it just wrote, which is this run's, not an old one
    finished = resume_guard.check_resume(run_dir, config, resume, bool(cfg.get("resume_override", False)),
                                         bool(cfg.get("restart", False)) or not dist_ctx.is_main)
    if finished is not None:  # resume=true on a finished run: report it, touch nothing
        if dist_ctx.is_main:
            dist_ctx.barrier()
            log.info("%s", run_summary(finished, run_dir / RESULTS_FILE,
                                       title="already finished (resume=true: nothing to do)"))
        return finished
    ckpt_dir = run_dir / "checkpoint"
    if dist_ctx.is_main:
        if not resume:
            for stale in (run_dir / STATE_FILE, run_dir / RESULTS_FILE):
                stale.unlink(missing_ok=True)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        (run_dir / FAILED_FILE).unlink(missing_ok=True)
        resume_guard.store_config(run_dir, config)
        dist_ctx.barrier()  # the other ranks wait for this (see run)
    run_dir = own_dir  # where this rank's state.json / results.json / failed.json go
    state = RunState(run_dir, resume)
    state.start_session(ckpt_dir / "last.pt")
    progress = bool(cfg.get("progress", True)) and dist_ctx.is_main  # one set of bars under torchrun
    if not is_terminal():
        quiet_library_bars()  # no redrawn bars from transformers/hub/datasets in log files
    name = f"{cfg.model.name}-{cfg.data.name}-{cfg.quant.name}-b{cfg.quant.bits:g}-r{cfg.lora.rank}-s{cfg.seed}"
    # W&B starts at the first metric; rank 0 alone logs
    logger: RunLogger = make_logger(cfg, run_dir, config, group, name) if dist_ctx.is_main else RunLogger()
    prefix = metric_prefix(cfg)
    stages = progress_bar(len(STAGES), "stages", progress, announce=True, position=0)
    failed = False
    try:
        device = dist_ctx.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        results = _run_stages(cfg, run_dir, ckpt_dir, state, device, progress, logger, stages, prefix, dist_ctx)
        finish_results(results, dist_ctx, state, device, run_dir, config)
        atomic_write_json(run_dir / RESULTS_FILE, results)
        state.end_session()
        from lowra.checkpoint import is_checkpoint

        if is_checkpoint(run_dir / "model"):  # the saved model supersedes the resume copy
            shutil.rmtree(ckpt_dir / "quantized", ignore_errors=True)
        logger.log_results(results)
        stages.update(1)
    except BaseException as exc:
        failed = True
        state.end_session()
        resume_guard.mark_failed(run_dir, exc, str(getattr(stages, "desc", "")), state)
        raise
    finally:
        stages.close()
        logger.finish(exit_code=1 if failed else 0)
    log.info("%s", run_summary(results, run_dir / RESULTS_FILE))  # after W&B's summary: the last screen
    return results


@dataclass
class _Stages:
    """What every stage of one run reads: the config, where it writes, its bookkeeping and outputs."""

    cfg: DictConfig
    run_dir: Path
    ckpt_dir: Path
    state: RunState
    device: torch.device
    progress: bool
    logger: RunLogger
    bar: Any  # the bar over the stages
    prefix: str  # the metric's prefix (ppl / rouge)
    dist_ctx: DistContext
    peaks: Any = None  # lowra.streaming.PeakMemory: peak host RSS / device memory per stage
    model: Any = None  # the model: None until loaded (never, when streamed), then quantized in place or reloaded

    def start(self, index: int) -> None:
        self.bar.set_description(f"stages: {STAGES[index]}")


def _run_stages(
    cfg: DictConfig, run_dir: Path, ckpt_dir: Path, state: RunState, device: torch.device, progress: bool,
    logger: RunLogger, stages: Any, prefix: str, dist_ctx: DistContext | None = None,
) -> dict[str, Any]:
    ctx = _Stages(cfg, run_dir, ckpt_dir, state, device, progress, logger, stages, prefix,
                  dist_ctx or DistContext("single", 0, 1, 0, device))
    steps_wanted = cfg.train.max_steps is None or int(cfg.train.max_steps) > 0
    tokenizer, data, stream, harness_plan = _stage_load(ctx, steps_wanted)
    report = _stage_quantize(ctx, stream, data)
    _stage_evaluate_quantized(ctx, tokenizer, data, report)
    result = _stage_finetune(ctx, tokenizer, data, steps_wanted)
    finetuned, harness = _stage_evaluate(ctx, tokenizer, data, report, harness_plan, steps_wanted)
    memory, n_trainable = _stage_save(ctx, tokenizer, stream)
    return stage_results(cfg, prefix, report, state, finetuned, result, n_trainable, data, memory, harness)


def _stage_load(ctx: _Stages, steps_wanted: bool) -> tuple[Any, Any, bool, Any]:
    """1. load: tokenizer, data, the model (``ctx.model``, unless streamed) and its full-precision metric;
    ``(tokenizer, data, stream, lm-eval harness plan)``."""
    cfg, state, prefix = ctx.cfg, ctx.state, ctx.prefix
    ctx.start(0)
    tokenizer = load_tokenizer(cfg.model)
    data = load_data(cfg.data, tokenizer, need_train=steps_wanted or needs_calibration(cfg))
    from lowra.streaming import PeakMemory

    ctx.peaks = PeakMemory(release=True)  # peak host RSS / device memory per stage (free heap returned at each start)
    stream = use_streaming(cfg, ctx.device)
    model = None
    ctx.peaks.begin("load")
    if stream:  # the full-precision model is never loaded: quantize_pretrained reads it block by block
        if cfg.eval.fp and f"{prefix}_fp" not in state:
            log.info("quant.stream: the full-precision model is not loaded, %s_fp is not measured", prefix)
            state.set(**{f"{prefix}_fp": None})
    else:
        model = load_model(cfg.model, ctx.device)
        apply_checkpointing(model, cfg.model)
    # eval.harness: fails here, not after training (streamed: the model's context is checked by lm-eval)
    harness_plan = plan_harness(cfg, model, ctx.run_dir / "lm_eval_tasks")
    if cfg.eval.fp and f"{prefix}_fp" not in state:
        state.set(**{f"{prefix}_fp": metric_value(evaluate(model, tokenizer, data, cfg, ctx.device, "eval fp",
                                                           ctx.progress))})
    ctx.peaks.end()
    if cfg.eval.fp:
        _log_metric(ctx.logger, f"{prefix}_fp", state.get(f"{prefix}_fp"))
    ctx.bar.update(1)
    ctx.model = model
    return tokenizer, data, stream, harness_plan


def _stage_quantize(ctx: _Stages, stream: bool, data: Any) -> dict[str, Any]:
    """2. quantize ``ctx.model`` (or reload the quantized init of an interrupted run); the quant report."""
    from lowra import load_quantized, quantize_model, quantize_pretrained, save_quantized

    cfg, state, device = ctx.cfg, ctx.state, ctx.device
    ctx.start(1)
    quant_dir = ctx.ckpt_dir / "quantized"
    torch.manual_seed(int(cfg.seed))
    ctx.peaks.begin("quantize")
    if ("quantize_time_s" in state and quant_dir.exists()) or stream:
        if "quantize_time_s" not in state or not quant_dir.exists():  # stream: quantize to quant_dir first
            t0 = time.perf_counter()
            res = quantize_pretrained(model_location(cfg.model), quant_dir,
                                      **stream_kwargs(cfg, ctx.progress, device, data))
            state.set(quantize_time_s=time.perf_counter() - t0, quant_report=res.report.to_dict(),
                      quant_stream_stages=res.stages, quant_stream_resumed=res.resumed)
        ctx.model = None  # the full-precision model (of a resumed run) is released before the reload
        ctx.model = load_quantized(str(quant_dir), device=str(device))
        model = ctx.model
        apply_checkpointing(model, cfg.model)
        report = state.get("quant_report")
    else:
        model = ctx.model
        t0 = time.perf_counter()
        data_kw = calibration_kwargs(cfg, data) if needs_calibration(cfg) else {}
        # per-stage progress: bars on a terminal, plain log lines otherwise (lowra.progress)
        rep = quantize_model(model, lowra_config(cfg), progress=ctx.progress, **data_kw)
        quantize_time = time.perf_counter() - t0
        report = rep.to_dict()
        if ctx.dist_ctx.is_main:  # atomic (written beside, renamed): the resume point
            save_quantized(model, str(quant_dir), report=rep, source_model=model_location(cfg.model))
        state.set(quantize_time_s=quantize_time, quant_report=report)
    ctx.peaks.end()
    if ctx.dist_ctx.distributed:  # every rank quantized (or loaded) the same model: checked, never assumed
        check_same_on_all_ranks(ctx.dist_ctx, model)
    atomic_write_json(ctx.run_dir / "quant_report.json", report)
    if report.get("low_bits_init"):
        log.info("quant.low_bits_init: %.3f code bits per weight, below %g: the init ran %d alternations "
                 "with %s codebooks (quant.low_bits_init=null keeps quant.loftq_iters / quant.init_codebooks)",
                 report["bits_nominal"], cfg.quant.low_bits_init.below, report["loftq_iters"],
                 report["init_codebooks"])
    ctx.logger.log_bit_allocation(
        {layer["name"]: {int(b): int(n) for b, n in layer.get("bits_histogram", {}).items()}
         for layer in report.get("layers", [])}
    )
    ctx.bar.update(1)
    return report


def _stage_evaluate_quantized(ctx: _Stages, tokenizer: Any, data: Any, report: dict[str, Any]) -> None:
    """3. evaluate before fine-tuning: the quantized base alone and with its initialized adapters."""
    cfg, state, prefix, model = ctx.cfg, ctx.state, ctx.prefix, ctx.model
    ctx.start(2)
    ctx.peaks.begin("evaluate (before fine-tuning)")
    if f"{prefix}_quantized" not in state:
        with adapters_disabled(model):
            quantized = evaluate(model, tokenizer, data, cfg, ctx.device, "eval quantized", ctx.progress)
        loftq = None
        if int(report.get("loftq_iters", cfg.quant.loftq_iters)) > 0:  # what ran (quant.low_bits_init may set it)
            loftq = evaluate(model, tokenizer, data, cfg, ctx.device, "eval loftq", ctx.progress)
        state.set(**{f"{prefix}_quantized": metric_value(quantized), f"{prefix}_loftq": metric_value(loftq)})
    ctx.peaks.end()
    for key in (f"{prefix}_quantized", f"{prefix}_loftq"):
        _log_metric(ctx.logger, key, state.get(key))
    ctx.bar.update(1)


def _training_batches(cfg: DictConfig, data: Any, tokenizer: Any) -> LMBatches | PairBatches:
    """The micro-batches of the fine-tune: packed LM blocks, or summarization pairs."""
    if isinstance(data, LMData):
        return LMBatches(pack_blocks(data.train_ids, int(cfg.train.seq_len)), int(cfg.train.batch_size),
                         int(cfg.train.seed))
    return PairBatches(
        data.train, tokenizer, cfg.model.arch, int(cfg.train.batch_size), int(cfg.train.seed),
        int(cfg.train.seq_len), int(cfg.data.target_length), cfg.data.prompt_template,
    )


def _stage_finetune(ctx: _Stages, tokenizer: Any, data: Any, steps_wanted: bool) -> TrainResult:
    """4. fine-tune the adapters (and the trainable base tables); nothing when ``train.max_steps=0``."""
    cfg, device, dist_ctx, model = ctx.cfg, ctx.device, ctx.dist_ctx, ctx.model
    ctx.start(3)
    optimizer = resolve_optimizer(cfg.train.get("optimizer"), str(cfg.quant.name), device)
    result = TrainResult(steps=0, loss_final=None, time_s=0.0, resumed_from=0, optimizer=optimizer)
    if steps_wanted:
        batches: LMBatches | PairBatches | RankBatches = _training_batches(cfg, data, tokenizer)
        param_lrs, no_decay = train_base_tables(model, cfg.train)  # train.codebooks / train.scales
        train_model = wrap_for_training(model, dist_ctx, bool(cfg.train.get("fsdp_shard_base", True)))
        if dist_ctx.distributed:
            batches = RankBatches(batches, dist_ctx.rank, dist_ctx.world_size)
        ctx.peaks.begin("fine-tune")  # the teacher of train.distill is loaded inside: its memory counts here
        teacher, teacher_stats = (load_teacher(cfg.model, device) if distill_options(cfg.train)[0] > 0
                                  else (None, None))
        options = TrainOptions.from_run_config(
            cfg, device=device, log_fn=ctx.logger.log, progress=ctx.progress and dist_ctx.is_main,
            optimizer=optimizer, dist=dist_ctx if dist_ctx.distributed else None,
            teacher=teacher, teacher_stats=teacher_stats, param_lrs=param_lrs, no_decay=no_decay,
        )
        result = train(train_model, trainable_parameters(model), batches, ctx.ckpt_dir, options)
        del teacher, options
        ctx.peaks.end()
    ctx.bar.update(1)
    return result


def _stage_evaluate(ctx: _Stages, tokenizer: Any, data: Any, report: dict[str, Any], harness_plan: Any,
                    steps_wanted: bool) -> tuple[Any, dict[str, Any] | None]:
    """5. evaluate the fine-tuned model (and the lm-eval harness); ``(metric, harness results)``."""
    cfg, model = ctx.cfg, ctx.model
    ctx.start(4)
    finetuned = None  # train.max_steps=0: nothing was fine-tuned
    if steps_wanted:
        with ctx.peaks.stage("evaluate"):
            finetuned = metric_value(evaluate(model, tokenizer, data, cfg, ctx.device, "eval fine-tuned",
                                              ctx.progress))
    _log_metric(ctx.logger, f"{ctx.prefix}_finetuned", finetuned)
    harness = None
    if harness_plan is not None:  # lm-evaluation-harness + WikiText-2 (GPTQ) on the final model
        info = {"name": str(cfg.model.name), "source": model_location(cfg.model), "method": str(cfg.quant.name),
                "bits_target": float(cfg.quant.bits), "bits_nominal": report.get("bits_nominal"),
                "bits_effective": report.get("bits_effective"),
                "stage": "fine-tuned" if steps_wanted else "quantized (adapters at their init)"}
        full = run_harness(model, tokenizer, harness_plan, info, ctx.run_dir / "harness.json", ctx.progress)
        harness = {k: full[k] for k in ("window", "wikitext2", "tasks", "lm_eval")}
    ctx.bar.update(1)
    return finetuned, harness


def _stage_save(ctx: _Stages, tokenizer: Any, stream: bool) -> tuple[dict[str, Any] | None, int]:
    """6. save the quantized model + adapters; ``(memory report with the stage peaks, trainable count)``."""
    from lowra import memory_report, save_quantized

    cfg, state, dist_ctx, model = ctx.cfg, ctx.state, ctx.dist_ctx, ctx.model
    ctx.start(5)
    with gathered(model, dist_ctx):  # FSDP2: full parameters on every rank (gather-on-save)
        if cfg.save_model and dist_ctx.is_main:
            save_quantized(model, str(ctx.run_dir / "model"), report=getattr(model, "lowra_report", None),
                           source_model=model_location(cfg.model), tokenizer=tokenizer)
        memory = memory_report(model)
        n_trainable = sum(p.numel() for p in trainable_parameters(model).values())
    if memory is not None:
        memory["stages"] = ctx.peaks.to_dict()  # peak host RSS / device memory of load, quantize, fine-tune
        memory["stream"] = stream
        if state.get("quant_stream_stages") is not None:
            memory["stream_stages"] = state.get("quant_stream_stages")
            memory["stream_resumed_blocks"] = state.get("quant_stream_resumed")
    return memory, n_trainable


# ------------------------------------------------------------------------------------- entry point


def _hydra_group() -> tuple[Path, str | None]:
    """The run directory and, in a multirun, the W&B group (the sweep directory's name)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    return run_dir, group


def main() -> None:
    import hydra

    @hydra.main(config_path=str(CONF_DIR), config_name="run", version_base="1.3")
    def _main(cfg: DictConfig) -> float | None:
        run_dir, group = _hydra_group()
        run_dir = resolve_path(run_dir)
        try:
            results = run(cfg, run_dir, group=cfg.logger.group or group, sweep=group is not None)
        except BudgetError as exc:
            if group is None:  # a single run: a bad budget is an error
                log.error("%s", exc)
                raise SystemExit(f"error: {exc}") from None
            # a sweep (-m +bits=… quant=a,b) crosses every budget with every method; a baseline
            # that does not accept a budget is skipped, and the sweep goes on
            log.warning("skipped: %s", exc)
            atomic_write_json(run_dir / "skipped.json", {"reason": str(exc)})
            return None
        except (ConfigError, DataUnavailableError, ModelUnavailableError) as exc:
            log.error("%s", exc)
            raise SystemExit(f"error: {exc}") from None
        except OSError as exc:  # a read-only or full output directory: failed.json (if it fits), one line
            stop = output_error(exc, f"the run's outputs in {run_dir}")
            if stop is None:
                raise
            log.error("%s", exc)
            raise stop from None
        value = results.get(f"{metric_prefix(cfg)}_finetuned")
        return value if isinstance(value, float) else None

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _main()


if __name__ == "__main__":
    main()
