"""lm-evaluation-harness and WikiText-2 perplexity (GPTQ convention) on a quantized + adapted model.

``python -m experiments.eval.evaluate [--checkpoint DIR | HYDRA_OVERRIDES…] [--tasks …]`` (see
:func:`main`). Three kinds of numbers, never mixed up:

* **lm-eval tasks** — ``lm_eval.simple_evaluate`` on ``HFLM(pretrained=<model instance>,
  tokenizer=…)``: the standard zero-shot tasks (``--tasks zeroshot`` = ARC-e/c, HellaSwag, PIQA,
  WinoGrande, BoolQ; their datasets come from the Hugging Face Hub — without it they fail at once
  with a message saying so, before the model is loaded) and two LOCAL tasks over the held-out
  TinyStories split of the shared corpora (``--tasks local``, works offline):

  - ``lowra_tinystories_cloze`` (multiple choice): the story without its last sentence, then the
    true last sentence against ``choices - 1`` last sentences of other held-out stories (seeded);
    ``acc`` and ``acc_norm`` (length-normalised by bytes, lm-eval's definition).
  - ``lowra_tinystories_rolling`` (``loglikelihood_rolling``): each held-out story scored whole;
    lm-eval's ``word_perplexity`` / ``byte_perplexity`` / ``bits_per_byte``.

  They are ordinary lm-eval YAML tasks written with their JSONL data into a directory
  (:func:`write_local_tasks`; ``--task-dir`` keeps it so that ``lm_eval --include_path DIR`` runs
  them too). The held-out stories are the runner's (``data=tinystories``: the last 10 % by story).
* **WikiText-2 perplexity, GPTQ convention** (:mod:`experiments.eval.wikitext`): token-level, over
  non-overlapping ``window``-token windows (default 2048) of the raw test split; lm-eval's
  ``wikitext`` task reports WORD perplexity of a differently detokenized text and is not this number.

Results: one JSON file (atomic; model, method, bits, window, tasks, versions) and a table.

Modules: :mod:`experiments.eval.tasks` (the local task definitions, task resolution),
:mod:`experiments.eval.wikitext` (WikiText-2 perplexity), :mod:`experiments.eval.loading` (the
model to evaluate: a checkpoint, or the runner's config quantized now) and this one (the lm-eval
driver, the results table, the runner's ``eval.harness`` and the CLI).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from experiments.eval.loading import bits_of, load_checkpoint, load_for_eval, load_tokenizer_from
from experiments.eval.tasks import (
    CLOZE_TASK,
    LOCAL_TASKS,
    ROLLING_TASK,
    TASK_ALIASES,
    ZERO_SHOT_TASKS,
    HarnessUnavailableError,
    PreparedTasks,
    cloze_documents,
    default_stories,
    expand_tasks,
    prepare_tasks,
    story_sentences,
    task_manager,
    write_local_tasks,
)
from experiments.eval.wikitext import GPTQ_CONVENTION, default_wikitext, wikitext2_perplexity, wikitext2_rows
from experiments.runner.config_check import ConfigError, resolve_path
from experiments.runner.data import DataUnavailableError

__all__ = [
    "CLOZE_TASK", "GPTQ_CONVENTION", "LOCAL_TASKS", "ROLLING_TASK", "TASK_ALIASES", "ZERO_SHOT_TASKS",
    "HarnessPlan", "HarnessUnavailableError", "PreparedTasks", "bits_of", "cloze_documents", "default_stories",
    "default_wikitext", "evaluate_all", "expand_tasks", "load_checkpoint", "load_for_eval", "load_tokenizer_from",
    "main", "plan_harness", "prepare_tasks", "results_table", "run_harness", "run_lm_eval", "story_sentences",
    "task_manager", "wikitext2_perplexity", "wikitext2_rows", "write_local_tasks",
]

log = logging.getLogger("experiments.eval.harness")

# lm-eval's own metric keys are "<metric>,<filter>"; these are the ones the table shows per task kind
SHOWN_METRICS = ("acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte")

# ------------------------------------------------------------------------------------- lm-eval run


def _metric_rows(task_results: dict[str, Any]) -> dict[str, float | None]:
    """``{"acc": …, "acc_stderr": …}`` from lm-eval's ``{"acc,none": …, "acc_stderr,none": …}``."""
    out: dict[str, float | None] = {}
    for key, value in task_results.items():
        if "," not in key:
            continue
        metric, _filter = key.split(",", 1)
        if isinstance(value, (int, float)):
            out[metric] = float(value)
        elif value == "N/A":
            out[metric] = None
    return out


def run_lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    prepared: PreparedTasks,
    batch_size: int = 8,
    limit: int | None = None,
    num_fewshot: int | None = None,
    bootstrap_iters: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """``lm_eval.simple_evaluate`` on the model instance; ``{task: {metric: value, …, "samples": n}}``.

    ``limit``: the first ``limit`` documents of every task (for smoke runs; stored in the JSON).
    ``bootstrap_iters``: bootstrap resamples for the stderr of perplexity-type metrics (0: none).
    Every task is scored with lm-eval's defaults (``HFLM`` adds the tokenizer's special tokens to a
    context, so a Llama context starts with BOS) except ``loglikelihood_rolling`` tasks: lm-eval
    0.4.13 puts its own prefix token (BOS) before the tokenized document AND keeps the tokenizer's
    BOS in it, so that BOS would be scored as the first "word" (BOS predicted after BOS); those
    tasks run with ``add_bos_token=False`` — one BOS, context only, as the model was trained.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    _quiet_model_instance_warning()

    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be ≥ 1 documents, got {limit}")
    rolling = [t for t in prepared.tasks if t.get_config("output_type") == "loglikelihood_rolling"]
    others = [t for t in prepared.tasks if t.get_config("output_type") != "loglikelihood_rolling"]
    results: dict[str, dict[str, Any]] = {}
    was_training = model.training
    model.eval()
    try:
        for tasks, add_bos in ((others, None), (rolling, False)):
            if not tasks:
                continue
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=add_bos)
            out = simple_evaluate(
                model=lm, tasks=tasks, task_manager=prepared.manager, num_fewshot=num_fewshot,
                limit=limit, bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed,
                numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            )
            for name, res in out["results"].items():
                row: dict[str, Any] = _metric_rows(res)
                row["samples"] = int(out.get("n-samples", {}).get(name, {}).get("effective", 0)) or None
                row["num_fewshot"] = out.get("n-shot", {}).get(name)
                row["add_bos_token"] = add_bos
                results[name] = row
    finally:
        model.train(was_training)
    return {name: results[name] for name in prepared.names if name in results} | results

class _DropInstanceWarning(logging.Filter):
    """lm-eval warns ``pretrained model kwarg is not of type str`` whenever HFLM gets a model instance —
    which is how this harness always calls it (the loaded quantized model); the warning says nothing here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "model kwarg is not of type" not in record.getMessage()


def _quiet_model_instance_warning() -> None:
    logger = logging.getLogger("lm_eval.models.huggingface")
    if not any(isinstance(f, _DropInstanceWarning) for f in logger.filters):
        logger.addFilter(_DropInstanceWarning())


# ------------------------------------------------------------------------------------ reporting


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def results_table(results: dict[str, Any]) -> str:
    """A Markdown table: one row per (task, metric), WikiText-2 first (labelled with its window)."""
    m = results["model"]
    bits = ("dense" if m.get("bits_nominal") is None
            else f"{m['bits_nominal']:.3f} nominal / {m['bits_effective']:.3f} effective")
    lines = [f"model {m['name']} ({m.get('method')}, bits {bits}) on {results['device']}", "",
             "| task | metric | value | ± stderr | samples |", "|---|---|---|---|---|"]
    w = results.get("wikitext2")
    if w is not None:
        part = "" if w["windows"] == w["windows_total"] else f", first {w['windows']} of {w['windows_total']} windows"
        lines.append(f"| wikitext2 (GPTQ, token-level, window {w['window']}{part}) | ppl | {_fmt(w['ppl'])} | — "
                     f"| {w['predicted_tokens']} tokens |")
    for task, row in results.get("tasks", {}).items():
        for metric in SHOWN_METRICS:
            if metric in row:
                lines.append(f"| {task} | {metric} | {_fmt(row[metric])} | {_fmt(row.get(metric + '_stderr'))} "
                             f"| {_fmt(row.get('samples'))} |")
    return "\n".join(lines)


def output_name(info: dict[str, Any]) -> str:
    """``harness_<model>_<method>_<bits>.json``: the model's name (not a run's timestamp folder), the method
    and the nominal bits (``fp`` for a dense model)."""
    bits = "fp" if info.get("bits_nominal") is None else f"b{info['bits_nominal']:.2f}"
    return f"harness_{info['name']}_{info.get('method')}_{bits}.json"


def default_output(checkpoint: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Beside the checkpoint folder (``<run>/model`` → ``<run>/harness_…json``), never inside it (its
    ``lowra_checksums.json`` lists its files) nor in the checkout."""
    return Path(checkpoint).resolve().parent / output_name(info)


# ------------------------------------------------------------------------------ runner (eval.harness)


@dataclass
class HarnessPlan:
    """``eval.harness`` of the runner, validated, with its tasks loaded (before quantization/training)."""

    tasks: list[str]
    window: int | None
    max_windows: int | None
    limit: int | None
    num_fewshot: int | None
    batch_size: int
    bootstrap_iters: int
    prepared: PreparedTasks | None = None
    local: dict[str, Any] | None = None


def _opt_int(hcfg: Any, key: str, minimum: int, default: int | None = None) -> int | None:
    value = hcfg.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"eval.harness.{key}={value!r} must be an integer ≥ {minimum} (or null)")
    return int(value)


def plan_harness(cfg: Any, model: torch.nn.Module, task_dir: str | os.PathLike) -> HarnessPlan | None:
    """The runner's ``eval.harness`` (None when absent or ``enabled: false``), checked against the
    loaded model and with its lm-eval tasks loaded — so that a bad window or an unreachable dataset
    hub fails in the runner's first stage, not after fine-tuning. Local tasks go into ``task_dir``."""
    hcfg = cfg.eval.get("harness")
    if hcfg is None or not hcfg.get("enabled", False):
        return None
    if cfg.model.arch != "causal_lm":
        raise ConfigError(f"eval.harness needs a causal LM; model={cfg.model.name} is {cfg.model.arch}")
    tasks_spec = str(hcfg.get("tasks", "local"))
    plan = HarnessPlan(
        tasks=[] if tasks_spec.strip() == "none" else expand_tasks(tasks_spec),
        window=_opt_int(hcfg, "window", 2), max_windows=_opt_int(hcfg, "max_windows", 1),
        limit=_opt_int(hcfg, "limit", 1), num_fewshot=_opt_int(hcfg, "num_fewshot", 0),
        batch_size=_opt_int(hcfg, "batch_size", 1, 8) or 8,
        bootstrap_iters=_opt_int(hcfg, "bootstrap_iters", 0, 1000) or 0,
    )
    if plan.window is None and not plan.tasks:
        raise ConfigError("eval.harness is enabled with tasks=none and window=null: nothing to evaluate")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if plan.window is not None and context is not None and plan.window > int(context):
        raise ConfigError(f"eval.harness.window={plan.window} exceeds the model's context "
                          f"(max_position_embeddings={context}); set eval.harness.window ≤ {context}")
    if any(t in LOCAL_TASKS for t in plan.tasks):
        plan.local = write_local_tasks(task_dir)
    if plan.tasks:
        try:
            plan.prepared = prepare_tasks(plan.tasks, task_dir if plan.local else None)
        except ValueError as exc:
            raise ConfigError(f"eval.harness.tasks: {exc}") from exc
    return plan


def run_harness(
    model: torch.nn.Module, tokenizer: Any, plan: HarnessPlan, info: dict[str, Any], out: str | os.PathLike,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``plan`` on the (fine-tuned) model, write ``out`` (atomic JSON), log the table."""
    from lowra.atomic import write_text_atomic

    results = evaluate_all(model, tokenizer, info, plan.prepared, plan.local, plan.window, plan.batch_size,
                           plan.limit, plan.max_windows, plan.bootstrap_iters, plan.num_fewshot, progress=progress)
    write_text_atomic(out, json.dumps(results, indent=1, default=str) + "\n")
    log.info("lm-evaluation-harness (%s):\n%s", out, results_table(results))
    return results


# ------------------------------------------------------------------------------------------ main


def evaluate_all(
    model: torch.nn.Module,
    tokenizer: Any,
    info: dict[str, Any],
    prepared: PreparedTasks | None,
    local_tasks: dict[str, Any] | None,
    window: int | None,
    batch_size: int,
    limit: int | None,
    max_windows: int | None,
    bootstrap_iters: int,
    num_fewshot: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """WikiText-2 perplexity (unless ``window`` is None) and the prepared lm-eval tasks → results dict."""
    import lm_eval

    from experiments.runner.logging_utils import versions

    device = next(model.parameters()).device
    t0 = time.perf_counter()
    wikitext = None
    if window is not None:
        wikitext = wikitext2_perplexity(model, tokenizer, window=window, batch_size=batch_size,
                                        max_windows=max_windows, device=device, progress=progress)
    tasks = run_lm_eval(model, tokenizer, prepared, batch_size=batch_size, limit=limit, num_fewshot=num_fewshot,
                        bootstrap_iters=bootstrap_iters) if prepared is not None else {}
    return {
        "model": info,
        "bits": {k: info.get(k) for k in ("bits_target", "bits_nominal", "bits_effective")},
        "window": window,
        "wikitext2": wikitext,
        "tasks": tasks,
        "lm_eval": {"version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
                    "limit": limit, "num_fewshot": num_fewshot, "bootstrap_iters": bootstrap_iters,
                    "batch_size": batch_size, "local_tasks": local_tasks},
        "device": str(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu",
        "time_s": time.perf_counter() - t0,
        "versions": {**versions(), "lm_eval": _lm_eval_version()},
    }


def _lm_eval_version() -> str | None:
    import importlib.metadata as md

    try:
        return md.version("lm_eval")
    except md.PackageNotFoundError:
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.eval.evaluate",
        description="lm-evaluation-harness tasks and WikiText-2 perplexity (GPTQ convention) on a quantized + "
                    "adapted model: a LowRA checkpoint (--checkpoint) or the runner's config quantized now "
                    "(Hydra overrides, e.g. +model=stories260k +bits=2 quant=lowra).",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides of conf/run.yaml (model, bits, quant …)")
    p.add_argument("--checkpoint", help="a saved model (lowra.save_quantized dir or an HF model folder)")
    p.add_argument("--tokenizer", help="tokenizer path/id (default: the checkpoint's, else its source model)")
    p.add_argument("--fp", action="store_true", help="evaluate the full-precision model (no quantization)")
    p.add_argument("--tasks", default="local",
                   help="comma-separated lm-eval tasks; aliases: local = " + ",".join(LOCAL_TASKS)
                        + "; zeroshot = " + ",".join(ZERO_SHOT_TASKS) + "; none = WikiText-2 only")
    p.add_argument("--window", type=int, default=2048,
                   help="WikiText-2 window in tokens (GPTQ: 2048; ≤ the model's context); 0 skips it")
    p.add_argument("--max-windows", type=int, help="WikiText-2: only the first N windows (smoke runs)")
    p.add_argument("--limit", type=int, help="lm-eval: the first N documents of each task (smoke runs)")
    p.add_argument("--num-fewshot", type=int, help="lm-eval: few-shot examples (default: the tasks' own, 0 here)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="lm-eval stderr bootstrap (0: none)")
    p.add_argument("--stories", help="TinyStories file for the local tasks (default: the shared corpus)")
    p.add_argument("--task-dir", help="write the local task YAML/JSONL here and keep them (default: a temp dir)")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", "--out", dest="out",
                   help="results JSON (default, with --checkpoint: harness_<model>_<method>_<bits>.json beside the "
                        "checkpoint folder; required without it)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point; exits with status 2 and a one-paragraph message on an input/offline error."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lm_eval", "lm-eval", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from experiments.runner.setup import ModelUnavailableError, pick_device

    if args.out is None and args.checkpoint is None:
        print("error: --output FILE is required without --checkpoint (the results go beside a checkpoint, "
              "or where --output says)", file=sys.stderr)
        raise SystemExit(2)
    try:
        return _main(args, pick_device)
    except (ValueError, ConfigError, HarnessUnavailableError, DataUnavailableError, ModelUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as exc:  # a bad output directory (experiments.runner.output_check): one line, exit code 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            raise SystemExit(1) from None
        raise


def _main(args: argparse.Namespace, pick_device: Any) -> dict[str, Any]:
    import lowra.atomic
    from experiments.runner.output_check import check_writable, output_error

    names = [] if args.tasks.strip() == "none" else expand_tasks(args.tasks)
    window = args.window or None
    if window is None and not names:
        raise ValueError("nothing to evaluate: --tasks none and --window 0")
    # a read-only / full / impossible output directory fails here, before the model is loaded
    check_writable(Path(args.out).parent if args.out else Path(args.checkpoint).resolve().parent, "the results")
    with contextlib.ExitStack() as stack:
        local = None
        task_dir = None
        if any(n in LOCAL_TASKS for n in names):
            task_dir = Path(args.task_dir) if args.task_dir else Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="lowra_lm_eval_")))
            local = write_local_tasks(task_dir, resolve_path(args.stories) if args.stories else None)
        prepared = prepare_tasks(names, task_dir) if names else None  # fails before the model loads
        device = pick_device(args.device)
        model, tokenizer, info = load_for_eval(args.checkpoint, args.overrides, device, fp=args.fp,
                                               tokenizer=args.tokenizer)
        results = evaluate_all(model, tokenizer, info, prepared, local, window, args.batch_size, args.limit,
                               args.max_windows, args.bootstrap_iters, args.num_fewshot,
                               progress=not args.no_progress)
    out = Path(args.out) if args.out else default_output(args.checkpoint, info)
    try:
        lowra.atomic.write_text_atomic(out, json.dumps(results, indent=1, default=str) + "\n")
    except OSError as exc:  # e.g. the disk filled up during the evaluation
        stop = output_error(exc, f"the results {out}")
        if stop is None:
            raise
        raise stop from None
    print(results_table(results))
    print(f"\n(results: {out})")
    return results


if __name__ == "__main__":  # pragma: no cover
    main()
