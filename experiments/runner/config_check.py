"""Validate a composed run config before any heavy work (no weights, no data are loaded).

Every error names the offending key, its value and the accepted choices, e.g.
``quant.bits=5.0 is out of range for quant=lowra: accepted 1.0 ≤ bits ≤ 4.0``. Unknown group
options (``+model=nope``) are already rejected by Hydra at composition time with the list of
available options; :func:`group_options` gives the same list for our own messages.

Paths: config paths relative to the repository root (``../shared/assets/…``) are resolved
against the root, never against the current directory (:func:`resolve_path`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"

MODEL_ARCHS = ("causal_lm", "seq2seq")
DATA_TASKS = ("lm", "summarization")
DATA_LOADERS = ("story_file", "hub_text", "hub_summarization")
CANDIDATE_BITS = (1, 2, 3, 4)
CODEBOOKS = ("learned", "nf")
PLANS = ("ilp", "uniform")
#: lowra.error_tables.ERROR_TABLES (kept torch-free here)
ERROR_TABLES = ("sse", "fisher", "relative", "kfac", "measured")
INITS = ("loftq", "calibrated")
BUDGET_KINDS = ("nominal", "effective")
SCHEDULERS = ("cosine", "linear", "constant")
#: ``train.codebooks`` / ``train.scales``: the quantized base's codebooks / group scales frozen or trained
BASE_TABLES = ("frozen", "trainable")
#: ``auto``: the method's optimizer (``lowra.methods.optimizer_for``: paged 8-bit AdamW for QLoRA on
#: CUDA, else AdamW); ``paged_adamw_8bit`` falls back to AdamW without CUDA/bitsandbytes.
OPTIMIZERS = ("auto", "adamw", "paged_adamw_8bit")
LOGGERS = ("wandb", "none")
DTYPES = ("float32", "float16", "bfloat16")
SOURCES = ("local", "hub")
#: ``quant.stream``: quantize block by block from the checkpoint (lowra.quantize_pretrained)
STREAM_MODES = ("auto", True, False)


class ConfigError(ValueError):
    """An invalid run configuration (raised before anything heavy happens)."""


class BudgetError(ConfigError):
    """``quant.bits`` outside the budgets the quant option accepts (a sweep skips such a job)."""


def resolve_path(path: str | Path) -> Path:
    """An absolute path; relative ones are taken relative to the repository root."""
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def group_options(group: str) -> list[str]:
    """The option names of a config group (``conf/<group>/*.yaml``)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")


def _positive_int(key: str, value: Any, allow_zero: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{key}={value!r} must be a {'non-negative' if allow_zero else 'positive'} integer")


def _check_distill(t: Any, m: Any) -> None:
    """``train.distill``: weight in [0, 1], temperature > 0, chunk_tokens ≥ 1; on (weight > 0) only
    for a causal LM trained in one process (the chunked loss calls the decoder and LM head directly)."""
    d = t.get("distill")
    if not d:
        return
    weight = d.get("weight", 0.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0.0 <= float(weight) <= 1.0:
        raise ConfigError(f"train.distill.weight={weight!r} must be a number in [0, 1]")
    _positive_float("train.distill.temperature", d.get("temperature", 1.0))
    _positive_int("train.distill.chunk_tokens", d.get("chunk_tokens", 512))
    if float(weight) > 0 and m.arch != "causal_lm":
        raise ConfigError(f"train.distill.weight={weight} needs model.arch=causal_lm (got {m.arch})")
    if float(weight) > 0 and t.get("strategy", "single") != "single":
        raise ConfigError(f"train.distill.weight={weight} needs train.strategy=single (got {t.strategy})")


def _check_model_lengths(m: Any) -> None:
    """``model.max_length`` > 0; ``model.loss_chunk_tokens`` null or > 0, and null unless a causal LM."""
    _positive_int("model.max_length", m.max_length)
    _positive_int("model.loss_chunk_tokens", m.get("loss_chunk_tokens"), allow_none=True)
    if m.get("loss_chunk_tokens") is not None and m.arch != "causal_lm":
        raise ConfigError(f"model.loss_chunk_tokens={m.loss_chunk_tokens} needs model.arch=causal_lm (got {m.arch}); "
                          "set it to null")


def _check_base_tables(t: Any, q: Any) -> None:
    """``train.codebooks`` / ``train.scales``: frozen | trainable, each with a positive learning rate;
    trainable scales need fp16-stored absmax (not double-quantized), and the tables train in one process
    or under DDP (FSDP2 would shard the per-layer tables)."""
    for key, lr_key in (("codebooks", "codebook_lr"), ("scales", "scale_lr")):
        _choice(f"train.{key}", t.get(key, "frozen"), BASE_TABLES)
        if t.get(key, "frozen") == "trainable":
            _positive_float(f"train.{lr_key}", t.get(lr_key))
            if t.get("strategy", "single") == "fsdp2":
                raise ConfigError(f"train.{key}=trainable needs train.strategy=single or ddp (got fsdp2)")
    if t.get("scales", "frozen") == "trainable" and q.get("double_quant", False):
        raise ConfigError("train.scales=trainable needs quant.double_quant=false (double-quantized scales are "
                          "8-bit codes)")


def _positive_float(key: str, value: Any, allow_zero: bool = False) -> None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} must be a number") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(f"{key}={value!r} must be a {'non-negative' if allow_zero else 'positive'} number")


def _existing(key: str, value: Any) -> None:
    if value is None:
        return
    path = resolve_path(value)
    if not path.exists():
        from experiments.assets import missing_hint

        hint = missing_hint(path)
        raise ConfigError(
            f"{key}={value!r}: no such file or directory ({path}). "
            + (f"Missing model: {hint}, or override {key}=/absolute/path" if hint else
               f"Set LOWRA_ASSETS to the shared assets directory or override {key}=/absolute/path")
        )


def check_bits(quant: Any) -> float:
    """``quant.bits`` as a float, inside the quant option's accepted budgets."""
    try:
        bits = float(quant.bits)
    except (TypeError, ValueError):
        raise ConfigError(f"quant.bits={quant.bits!r} must be a number (set it with +bits=B)") from None
    choices = quant.get("budget_choices")
    if choices:
        if not any(math.isclose(bits, float(c)) for c in choices):
            raise BudgetError(
                f"quant.bits={bits:g} is not accepted by quant={quant.name}: choose +bits= one of "
                f"{[float(c) for c in choices]}"
            )
    else:
        # an effective budget counts every stored bit (codebooks, scales, index): it may exceed 4
        high = 16.0 if quant.get("budget_kind") == "effective" else float(quant.budget_max)
        if not (float(quant.budget_min) - 1e-9 <= bits <= high + 1e-9):
            raise BudgetError(
                f"quant.bits={bits:g} is out of range for quant={quant.name}: accepted "
                f"{float(quant.budget_min):g} ≤ bits ≤ {high:g} (set +bits=B)"
            )
    return bits


def streamable(cfg: Any) -> str | None:
    """None when ``lowra.quantize_pretrained`` can quantize this config, else why it cannot — asked of
    the method (``lowra.methods.unstreamable``: the dense baseline, or calibration statistics)."""
    from lowra.config import LowRAConfig
    from lowra.methods import unstreamable

    return unstreamable(LowRAConfig.from_hydra(cfg))


def check_config(cfg: Any, ignored_budget_ok: bool = False) -> None:
    """Raise :class:`ConfigError` on the first problem of a composed run config.

    ``ignored_budget_ok``: accept ``+bits=B`` for a method that ignores the budget (``quant=lora``,
    dense base) — in a sweep such a job is the dense reference for that budget; in a single run
    the budget would be silently ignored, so it is an error.
    """
    for key in ("model", "data", "quant", "train", "eval", "logger", "lora"):
        if key not in cfg or cfg[key] is None:
            raise ConfigError(f"config has no '{key}' section")
    _check_model(cfg)
    _check_data(cfg.data, cfg.model)
    _check_quant(cfg, ignored_budget_ok)
    _check_train(cfg.train, cfg.model, cfg.quant)
    _check_eval(cfg.eval, cfg.model)
    _choice("logger.name", cfg.logger.name, LOGGERS)


def _check_model(cfg: Any) -> None:
    """``model.*``, ``lora.*`` and ``device``."""
    m = cfg.model
    _choice("model.arch", m.arch, MODEL_ARCHS)
    _choice("model.source", m.source, SOURCES)
    _choice("model.dtype", m.dtype, DTYPES)
    if m.source == "local":
        _existing("model.pretrained", m.pretrained)
    if not m.target_modules:
        raise ConfigError("model.target_modules is empty: name the nn.Linear modules to adapt")
    _check_model_lengths(m)
    _positive_int("lora.rank", cfg.lora.rank)
    _positive_float("lora.alpha", cfg.lora.alpha)
    if not 0.0 <= float(cfg.lora.dropout) < 1.0:
        raise ConfigError(f"lora.dropout={cfg.lora.dropout!r} must be in [0, 1)")
    _choice("device", cfg.device, ("auto", "cpu", "cuda") + tuple(f"cuda:{i}" for i in range(16)))


def _check_data(d: Any, m: Any) -> None:
    """``data.*``: task and loader, the task the model's architecture needs, the files or hub path."""
    _choice("data.task", d.task, DATA_TASKS)
    _choice("data.loader", d.loader, DATA_LOADERS)
    if m.arch == "seq2seq" and d.task != "summarization":
        raise ConfigError(
            f"model={m.name} is a seq2seq model: it needs a summarization dataset, "
            f"data={d.name} is task {d.task!r}; choose data= one of "
            f"{[o for o in group_options('data') if o in ('xsum', 'cnn_dailymail')]}"
        )
    if d.loader == "story_file":
        for role in ("train", "eval"):
            if not d.local[role]:
                raise ConfigError(f"data.local.{role} must name the story file for data={d.name}")
        if d.heldout_fraction is None or not 0.0 < float(d.heldout_fraction) < 1.0:
            raise ConfigError(f"data.heldout_fraction={d.heldout_fraction!r} must be in (0, 1)")
    elif not d.hub_path and not (d.local.train and d.local.eval):
        raise ConfigError(f"data={d.name}: set data.hub_path or both data.local.train and data.local.eval")
    for role in ("train", "eval", "eval_fallback"):
        _existing(f"data.local.{role}", d.local.get(role))
    if d.task == "summarization" and not (d.source_field and d.target_field):
        raise ConfigError(f"data={d.name}: summarization needs data.source_field and data.target_field")


def _check_quant(cfg: Any, ignored_budget_ok: bool) -> None:
    """``quant.*``: the method, its budget, each option's choices, then every option together as
    ``lowra.LowRAConfig.from_hydra`` reads it, its calibration and ``quant.stream``."""
    from lowra.methods import method_names, method_of

    q = cfg.quant
    _choice("quant.method", q.method, method_names())
    method = method_of(str(q.method))
    check_bits(q)
    if not method.quantizes and not ignored_budget_ok:
        _check_ignored_budget(cfg.get("bits"), q)
    _check_quant_choices(q)
    config = _lowra_config(cfg)
    needs = method.needs(config)
    if needs.any and not isinstance(q.options.get("calibration"), Mapping):
        raise ConfigError(f"{needs.why} needs calibration text: set quant.options.calibration "
                          "{samples, seq_len, batch_size} (see conf/quant/lowra.yaml)")
    stream = q.get("stream", "auto")
    if stream not in STREAM_MODES:
        raise ConfigError(f"quant.stream={stream!r} is not one of ['auto', true, false]")
    if stream is True and streamable(cfg) is not None:
        raise ConfigError(f"quant.stream=true but {streamable(cfg)}; use quant.stream=false (or auto), or a data-free "
                          "setting (quant.error=sse|relative, quant.init=loftq; e.g. quant=lowra_paper)")


def _check_ignored_budget(requested: Any, q: Any) -> None:
    """``+bits=B`` for a method whose base stays dense: an error unless it equals ``quant.bits``."""
    if requested is None:
        return
    try:
        same = math.isclose(float(requested), float(q.bits))
    except (TypeError, ValueError):
        same = False
    if not same:
        raise ConfigError(
            f"+bits={requested} has no effect with quant={q.name}: its base stays dense "
            f"({float(q.bits):g}-bit); drop +bits, or choose a quantized method (quant=lowra|qlora|loftq|modulora)"
        )


def _check_quant_choices(q: Any) -> None:
    """Each ``quant.*`` option alone: one of its choices, or a number in its range."""
    for b in q.candidates:
        _choice("quant.candidates[]", b, CANDIDATE_BITS)
    if q.get("codebook") is not None:
        _choice("quant.codebook", q.codebook, CODEBOOKS)
    if q.get("plan") is not None:
        _choice("quant.plan", q.plan, PLANS)
    if q.get("error") is not None:
        _choice("quant.error", q.error, ERROR_TABLES)
    if q.get("init") is not None:
        _choice("quant.init", q.init, INITS)
    if q.get("budget_kind") is not None:
        _choice("quant.budget_kind", q.budget_kind, BUDGET_KINDS)
    if q.get("weight_power") is not None:
        _positive_float("quant.weight_power", q.weight_power, allow_zero=True)
    _positive_int("quant.group_size", q.group_size)
    _positive_int("quant.loftq_iters", q.loftq_iters, allow_zero=True)


def _lowra_config(cfg: Any) -> Any:
    """Every quant / lora option together, as quantize_model will get it (``lowra.LowRAConfig.from_hydra``);
    its error as a :class:`ConfigError` (a :class:`BudgetError` for a fractional budget of a one-width setting)."""
    from lowra.config import LowRAConfig

    try:
        return LowRAConfig.from_hydra(cfg)
    except ValueError as exc:
        if "integer width" in str(exc):  # a fractional budget for a one-width setting: a sweep skips the job
            raise BudgetError(f"quant={cfg.quant.name}: {exc}") from None
        raise ConfigError(f"quant={cfg.quant.name}: {exc}") from None


def _check_train(t: Any, m: Any, q: Any) -> None:
    """``train.*``: optimizer, schedule, step counts, rates, sequence length, distillation, base tables."""
    _choice("train.optimizer", t.optimizer, OPTIMIZERS)
    _choice("train.scheduler", t.scheduler, SCHEDULERS)
    _positive_int("train.max_steps", t.max_steps, allow_zero=True, allow_none=True)
    if t.max_steps is None:
        _positive_int("train.epochs", t.epochs)
    for key in ("batch_size", "grad_accum", "seq_len", "checkpoint_every", "log_every"):
        _positive_int(f"train.{key}", t[key])
    _positive_float("train.lr", t.lr)
    _positive_float("train.weight_decay", t.weight_decay, allow_zero=True)
    if t.max_grad_norm is not None:
        _positive_float("train.max_grad_norm", t.max_grad_norm)
    if not 0.0 <= float(t.warmup_ratio) < 1.0:
        raise ConfigError(f"train.warmup_ratio={t.warmup_ratio!r} must be in [0, 1)")
    _positive_int("train.warmup_steps", t.warmup_steps, allow_zero=True, allow_none=True)
    if t.seq_len > m.max_length:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_length={m.max_length}")
    _check_distill(t, m)
    _check_base_tables(t, q)


def _check_eval(e: Any, m: Any) -> None:
    """``eval.*``: positive sizes, windows within the model's context."""
    _positive_int("eval.window", e.window)
    _positive_int("eval.stride", e.stride)
    _positive_int("eval.batch_size", e.batch_size)
    _positive_int("eval.max_tokens", e.max_tokens, allow_none=True)
    _positive_int("eval.num_samples", e.num_samples)
    if e.window > m.max_length:
        raise ConfigError(f"eval.window={e.window} exceeds model.max_length={m.max_length}")
    if e.stride > e.window:
        raise ConfigError(f"eval.stride={e.stride} must be ≤ eval.window={e.window}")
