"""lm-evaluation-harness and WikiText-2 perplexity (GPTQ convention) on a quantized + adapted model.

``python -m experiments.evaluate [--checkpoint DIR | HYDRA_OVERRIDES…] [--tasks …]`` (see
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
* **WikiText-2 perplexity, GPTQ convention** (:func:`wikitext2_perplexity`): the raw test split's
  rows joined with ``"\\n\\n"``, tokenized ONCE (with the tokenizer's special tokens, as
  ``tokenizer(text)`` does), cut into non-overlapping ``window``-token windows (default 2048; the
  incomplete tail is dropped), mean NLL over every predicted token (``window - 1`` per window) →
  ``exp``. Token-level; lm-eval's ``wikitext`` task reports WORD perplexity of a differently
  detokenized document-level text and is not this number. The shared corpus keeps only the
  non-empty rows; the empty rows of the Hub split are put back from the line layout of
  ``wikitext2_test.tokens`` (same 4,358 lines), so the joined text is the Hub split's.

Results: one JSON file (atomic; model, method, bits, window, tasks, versions) and a table.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experiments.config_check import ConfigError, resolve_path
from experiments.data import DataUnavailableError, split_heldout, split_stories
from experiments.evaluate import perplexity

log = logging.getLogger("experiments.harness")

REPO_ROOT = Path(__file__).resolve().parents[1]
ZERO_SHOT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq")
CLOZE_TASK = "lowra_tinystories_cloze"
ROLLING_TASK = "lowra_tinystories_rolling"
LOCAL_TASKS = (CLOZE_TASK, ROLLING_TASK)
TASK_ALIASES = {"zeroshot": ZERO_SHOT_TASKS, "local": LOCAL_TASKS}
GPTQ_CONVENTION = (
    "token-level perplexity: raw test split rows joined with '\\n\\n', tokenized once, non-overlapping "
    "windows of `window` tokens (incomplete tail dropped), exp(mean NLL over the window-1 predicted "
    "tokens of every window) — as in the GPTQ repository (IST-DASLab/gptq, datautils + *_eval)"
)
# lm-eval's own metric keys are "<metric>,<filter>"; these are the ones the table shows per task kind
SHOWN_METRICS = ("acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte")


def _assets() -> Path:
    return Path(os.environ.get("LOWRA_ASSETS") or (REPO_ROOT.parent / "shared" / "assets")).resolve()


def default_stories() -> Path:
    return _assets() / "corpora" / "tinystories_valid.txt"


def default_wikitext() -> tuple[Path, Path]:
    corpora = _assets() / "corpora"
    return corpora / "wikitext2_raw_test.txt", corpora / "wikitext2_test.tokens"


class HarnessUnavailableError(DataUnavailableError):
    """An lm-eval task that cannot be loaded (dataset hub unreachable, dataset not cached)."""


# ----------------------------------------------------------------------------------- local tasks

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"”’'])\s+")


def story_sentences(story: str) -> list[str]:
    """Sentences of one story (split after ``.``/``!``/``?``, optionally followed by a closing quote)."""
    return [s.strip() for s in _SENTENCE_END.split(" ".join(story.split())) if s.strip()]


def cloze_documents(stories: Sequence[str], n_choices: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """Multiple-choice story endings: ``{"context", "choices" [n_choices], "label"}`` per usable story.

    A story is usable with at least 2 sentences; its context is every sentence but the last, the
    true ending is the last one, the distractors are distinct last sentences of OTHER stories of the
    same list (never equal to the true ending), drawn with ``random.Random(seed)``; the true ending's
    position is drawn too. Deterministic for given stories, ``n_choices`` and ``seed``.
    """
    if n_choices < 2:
        raise ValueError(f"n_choices must be ≥ 2, got {n_choices}")
    split = [story_sentences(s) for s in stories]
    usable = [(i, s) for i, s in enumerate(split) if len(s) >= 2]
    endings = sorted({s[-1] for _, s in usable})
    if len(endings) < n_choices:
        raise ValueError(f"need at least {n_choices} distinct story endings for the cloze task, got {len(endings)}")
    rng = random.Random(seed)
    docs = []
    for _, sents in usable:
        true = sents[-1]
        distractors: list[str] = []
        while len(distractors) < n_choices - 1:
            cand = endings[rng.randrange(len(endings))]
            if cand != true and cand not in distractors:
                distractors.append(cand)
        label = rng.randrange(n_choices)
        choices = distractors[:label] + [true] + distractors[label:]
        docs.append({"context": " ".join(sents[:-1]), "choices": choices, "label": label})
    return docs


def _cloze_yaml(data_file: Path, meta: dict[str, Any]) -> str:
    return f"""# written by experiments.harness.write_local_tasks — TinyStories held-out story endings
task: {CLOZE_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data_file))}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: {json.dumps(meta)}
"""


def _rolling_yaml(data_file: Path, meta: dict[str, Any]) -> str:
    return f"""# written by experiments.harness.write_local_tasks — TinyStories held-out stories, scored whole
task: {ROLLING_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data_file))}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
  source: {json.dumps(meta)}
"""


def write_local_tasks(
    directory: str | os.PathLike,
    stories_path: str | os.PathLike | None = None,
    heldout_fraction: float = 0.1,
    n_choices: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the local lm-eval tasks (YAML + JSONL) into ``directory``; returns what was written.

    The documents are the held-out stories of ``stories_path`` (blank-line separated; the last
    ``heldout_fraction`` by story, the split the runner evaluates on). Files are written atomically;
    the returned dict (``{"directory", "stories", "heldout", "cloze_docs", "sha256"}``) goes into
    the results JSON so that a number can be traced to its data.
    """
    from lowra.atomic import write_text_atomic

    path = Path(stories_path) if stories_path is not None else default_stories()
    if not path.is_file():
        raise DataUnavailableError(f"the local lm-eval tasks need the TinyStories file {path}, which does not exist "
                                   f"(set LOWRA_ASSETS or pass --stories)")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    _, heldout = split_heldout(split_stories(path.read_text(encoding="utf-8")), heldout_fraction)
    cloze = cloze_documents(heldout, n_choices=n_choices, seed=seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cloze_text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in cloze)
    rolling_text = "".join(json.dumps({"text": s}, ensure_ascii=False) + "\n" for s in heldout)
    meta = {"stories": str(path), "heldout_fraction": heldout_fraction, "n_choices": n_choices, "seed": seed}
    write_text_atomic(directory / "tinystories_cloze.jsonl", cloze_text)
    write_text_atomic(directory / "tinystories_stories.jsonl", rolling_text)
    write_text_atomic(directory / f"{CLOZE_TASK}.yaml", _cloze_yaml(directory / "tinystories_cloze.jsonl", meta))
    write_text_atomic(directory / f"{ROLLING_TASK}.yaml",
                      _rolling_yaml(directory / "tinystories_stories.jsonl", meta))
    digest = hashlib.sha256((cloze_text + rolling_text).encode()).hexdigest()
    return {"directory": str(directory), **meta, "heldout_stories": len(heldout), "cloze_docs": len(cloze),
            "sha256": digest}


# ------------------------------------------------------------------------------- task resolution


def expand_tasks(spec: str | Sequence[str]) -> list[str]:
    """Task names from a comma-separated string or a list; ``local`` / ``zeroshot`` expand (order kept)."""
    items = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if str(t).strip()]
    out: list[str] = []
    for item in items:
        for name in TASK_ALIASES.get(item, (item,)):
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError("no lm-eval task given (use e.g. --tasks local, --tasks zeroshot or --tasks none)")
    return out


@contextlib.contextmanager
def _datasets_offline(reason: str | None) -> Iterator[None]:
    """With no network, read Hub datasets from the local cache only (fail at once, no minute of retries)."""
    if reason is None:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


@dataclass
class PreparedTasks:
    """lm-eval tasks loaded (datasets read) before the model is: a missing dataset fails first."""

    names: list[str]
    manager: Any
    tasks: list[Any] = field(default_factory=list)


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None, include_defaults: bool) -> Any:
    """One ``lm_eval.tasks.TaskManager`` per (task directory, built-ins?) in a process: indexing the
    ~15k built-in task YAMLs takes tens of seconds on a small CPU."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def prepare_tasks(names: Sequence[str], task_dir: str | os.PathLike | None) -> PreparedTasks:
    """Load every task (its dataset included) through one ``TaskManager``.

    Local tasks come from ``task_dir`` (``include_path``; lm-eval's ~15k built-in task YAMLs are
    indexed only when a non-local task is asked for). Raises ``ValueError`` for an unknown task
    name and :class:`HarnessUnavailableError` — listing every task that failed, with the reason —
    when a Hub dataset cannot be read (no network and not in the local ``datasets`` cache).
    """
    from experiments.hub import no_network_reason

    builtin = [n for n in names if n not in LOCAL_TASKS]
    if any(n in LOCAL_TASKS for n in names) and task_dir is None:
        raise ValueError("local tasks need the directory written by write_local_tasks (task_dir)")
    manager = task_manager(str(task_dir) if task_dir is not None else None, bool(builtin))
    reason = no_network_reason() if builtin else None
    loaded, unknown, failed = [], [], []
    with _datasets_offline(reason):
        for name in names:
            try:
                loaded.extend(manager.load([name])["tasks"].values())
            except KeyError:
                unknown.append(name)
            except OSError as exc:  # ConnectionError, datasets' DatasetNotFoundError, hub's LocalEntryNotFoundError
                failed.append((name, exc))
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}: use names from `lm_eval ls tasks`, "
                         f"or the aliases {sorted(TASK_ALIASES)} ({', '.join(LOCAL_TASKS)} are local)")
    if failed:
        hub = f"the dataset hub is unreachable ({reason})" if reason else "the dataset could not be read"
        lines = [f"  {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                 for name, exc in failed]
        raise HarnessUnavailableError(
            f"{len(failed)} lm-eval task(s) cannot be loaded — {hub} and their datasets are not in the local "
            f"datasets cache:\n" + "\n".join(lines) + "\nRun them where the Hugging Face Hub is reachable "
            "(or with the datasets cached and HF_DATASETS_OFFLINE=1); offline, use --tasks local."
        )
    return PreparedTasks(list(names), manager, loaded)


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


# ---------------------------------------------------------------------------- WikiText-2 (GPTQ)


def wikitext2_rows(raw_path: str | os.PathLike, layout_path: str | os.PathLike) -> list[str]:
    """The rows of the Hub's ``wikitext-2-raw-v1`` test split rebuilt from the shared files.

    ``raw_path`` has the non-empty rows (without their ``"\\n"``); ``layout_path``
    (``wikitext2_test.tokens``) has all 4,358 lines, blank where the Hub row is ``""``. A non-empty
    Hub row is the raw line plus ``"\\n"``. The two files must agree line for line (same number of
    non-empty lines, same word count on each), else ``ValueError``.
    """
    raw = [line for line in Path(raw_path).read_text(encoding="utf-8").split("\n") if line.strip()]
    layout = Path(layout_path).read_text(encoding="utf-8").split("\n")
    if layout and layout[-1] == "":
        layout = layout[:-1]  # the file's final newline
    non_empty = [line for line in layout if line.strip()]
    if len(non_empty) != len(raw):
        raise ValueError(f"{layout_path} has {len(non_empty)} non-empty lines but {raw_path} has {len(raw)}: "
                         f"they are not the same split")
    rows, it = [], iter(raw)
    for line in layout:
        if line.strip():
            text = next(it)
            if len(text.split()) != len(line.split()):
                raise ValueError(f"{raw_path} and {layout_path} disagree at row {len(rows)}: "
                                 f"{text[:60]!r} vs {line[:60]!r}")
            rows.append(text + "\n")
        else:
            rows.append("")
    return rows


@torch.no_grad()
def wikitext2_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    window: int = 2048,
    raw_path: str | os.PathLike | None = None,
    layout_path: str | os.PathLike | None = None,
    batch_size: int = 4,
    max_windows: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """WikiText-2 test perplexity in the GPTQ convention (see the module docstring).

    Returns ``{"ppl", "nll", "window", "windows", "windows_total", "predicted_tokens",
    "corpus_tokens", "dropped_tail_tokens", "convention", "text"}``. ``max_windows`` evaluates only
    the first windows (a partial number, marked so by ``windows < windows_total``).
    """
    if window < 2:
        raise ValueError(f"window must be ≥ 2 tokens, got {window}")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None and window > int(context):
        raise ValueError(f"window={window} exceeds the model's context (max_position_embeddings={context}); "
                         f"pass a window ≤ {context} (the output states the window used)")
    default_raw, default_layout = default_wikitext()
    raw_path, layout_path = Path(raw_path or default_raw), Path(layout_path or default_layout)
    for p in (raw_path, layout_path):
        if not p.is_file():
            raise DataUnavailableError(f"WikiText-2 perplexity needs {p}, which does not exist (set LOWRA_ASSETS)")
    rows = wikitext2_rows(raw_path, layout_path)
    text = "\n\n".join(rows)
    ids = tokenizer(text, verbose=False)["input_ids"]  # once, with the tokenizer's own special tokens
    stream = torch.tensor(ids, dtype=torch.long)
    total = stream.numel() // window
    if total == 0:
        raise ValueError(f"the corpus has {stream.numel()} tokens, fewer than one window of {window}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be ≥ 1, got {max_windows}")
    n = min(total, max_windows) if max_windows is not None else total
    dev = device if device is not None else next(model.parameters()).device
    r = perplexity(model, stream, window=window, stride=window, max_tokens=n * window, batch_size=batch_size,
                   device=dev, desc=f"wikitext2 ppl (window {window})", progress=progress)
    assert r["windows"] == n and r["tokens"] == n * (window - 1)
    return {
        "ppl": r["ppl"], "nll": r["nll"], "window": window, "windows": n, "windows_total": total,
        "predicted_tokens": r["tokens"], "corpus_tokens": stream.numel(),
        "dropped_tail_tokens": stream.numel() - total * window, "convention": GPTQ_CONVENTION,
        "text": f"{raw_path} with the empty rows of {layout_path.name} (Hub wikitext-2-raw-v1 test, "
                f"{len(rows)} rows)",
    }


# --------------------------------------------------------------------------------- model loading


def load_checkpoint(directory: str | os.PathLike, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A saved quantized + adapted model: the ONE place the evaluation reads checkpoints.

    A ``lowra.save_quantized`` directory (``lowra.is_checkpoint``: the HF-native folder or the older
    manifest layout) goes through ``lowra.load_quantized``; any other Hugging Face model folder
    (``config.json``) through ``AutoModelForCausalLM.from_pretrained``.
    """
    import lowra

    path = Path(directory)
    if lowra.is_checkpoint(path):  # HF-native LowRA folders and the older manifest layout
        return lowra.load_quantized(str(path), device=str(device))
    if (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path))
        return model.to(device).eval()
    raise ValueError(f"--checkpoint {path}: neither a LowRA checkpoint (manifest.json) nor a Hugging Face model "
                     f"folder (config.json)")


def load_tokenizer_from(where: str) -> Any:
    """``AutoTokenizer.from_pretrained(where)`` (a local path, or a Hub id read from the cache when offline)."""
    from transformers import AutoTokenizer

    from experiments.hub import hub_access

    with hub_access("local" if Path(where).exists() else "hub"):
        try:
            return AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError) as exc:
            raise ValueError(f"could not load the tokenizer from {where!r} ({type(exc).__name__}: {exc}); "
                             f"pass --tokenizer") from exc


def _saved_options(model: torch.nn.Module) -> dict[str, Any]:
    """What a loaded checkpoint records about itself: the legacy manifest, else the HF quantization_config."""
    manifest = getattr(model, "lowra_manifest", None)
    if manifest:
        return manifest
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    options = dict(getattr(qc, "options", None) or {})
    return {**options, "source_model": getattr(qc, "source_model", None)}


def _checkpoint_tokenizer_location(path: Path, model: torch.nn.Module) -> str:
    """The checkpoint's own tokenizer files, else the source model recorded in it."""
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return str(path)
    manifest = _saved_options(model)
    where = manifest.get("source_model") or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not where:
        raise ValueError(f"{path}: no tokenizer in the checkpoint and no source model recorded; pass --tokenizer")
    return str(where)


def bits_of(model: torch.nn.Module) -> dict[str, float | None]:
    """Nominal and effective bits per weight over the quantized layers (parameter-weighted); None if dense."""
    from lowra.model import lowra_layers

    layers = [m for _, m in lowra_layers(model) if m.is_quantized]
    total = sum(m.in_features * m.out_features for m in layers)
    if not total:
        return {"bits_nominal": None, "bits_effective": None}
    return {k: sum(getattr(m, attr) * m.in_features * m.out_features for m in layers) / total
            for k, attr in (("bits_nominal", "nominal_bits"), ("bits_effective", "effective_bits"))}


def load_for_eval(
    checkpoint: str | None, overrides: Sequence[str], device: torch.device, fp: bool = False,
    tokenizer: str | None = None,
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """The model to evaluate, its tokenizer and a description (name, method, bits) for the JSON.

    ``checkpoint``: :func:`load_checkpoint` (quantized base + adapters as saved, e.g. a fine-tuned
    ``<run_dir>/model``). Otherwise the runner's Hydra config (``conf/run.yaml`` + ``overrides``)
    is composed and the model is loaded and quantized exactly as ``experiments.run`` does (LoftQ
    adapters initialised, no fine-tuning); ``fp``: skip quantization (the full-precision baseline).
    """
    if checkpoint is not None:
        if overrides:
            raise ValueError(f"give either --checkpoint or Hydra overrides, not both (got {list(overrides)})")
        path = Path(checkpoint)
        model = load_checkpoint(path, device)
        tok_from = tokenizer or _checkpoint_tokenizer_location(path, model)
        tok = load_tokenizer_from(tok_from)
        manifest = _saved_options(model)
        info = {"name": path.name if path.name != "model" else path.parent.name, "source": str(path.resolve()),
                "tokenizer": tok_from, "method": manifest.get("method"), "bits_target": manifest.get("bits")}
        return model, tok, {**info, **bits_of(model)}

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from experiments.config_check import check_config
    from experiments.data import load_data
    from experiments.run import (
        calibration_kwargs,
        load_model,
        load_tokenizer,
        lowra_api,
        model_location,
        needs_calibration,
        quantize_kwargs,
    )

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="run", overrides=list(overrides))
    check_config(cfg)
    OmegaConf.resolve(cfg)
    tok = load_tokenizer(cfg.model) if tokenizer is None else load_tokenizer_from(tokenizer)
    model = load_model(cfg.model, device)
    info: dict[str, Any] = {"name": str(cfg.model.name), "source": model_location(cfg.model),
                            "tokenizer": tokenizer or model_location(cfg.model), "overrides": list(overrides)}
    if fp or cfg.quant.method == "none" and int(cfg.quant.loftq_iters) == 0:
        return model, tok, {**info, "method": "fp" if fp else str(cfg.quant.name), "bits_target": None,
                            "bits_nominal": None, "bits_effective": None}
    kwargs = quantize_kwargs(cfg, progress=False)
    if needs_calibration(cfg):
        kwargs.update(calibration_kwargs(cfg, load_data(cfg.data, tok, need_train=True)))
    torch.manual_seed(int(cfg.seed))
    report = lowra_api("quantize_model")(model, **kwargs)
    model.eval()
    return model, tok, {**info, "method": str(cfg.quant.name), "bits_target": float(cfg.quant.bits),
                        "bits_nominal": report.bits_nominal, "bits_effective": report.bits_effective}


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


def default_output(info: dict[str, Any]) -> Path:
    bits = "fp" if info.get("bits_nominal") is None else f"b{info['bits_nominal']:.2f}"
    return REPO_ROOT / "results" / "eval" / f"harness_{info['name']}_{info.get('method')}_{bits}.json"


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

    from experiments.logging_utils import versions

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
        prog="python -m experiments.evaluate",
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
    p.add_argument("--out", help="results JSON (default: results/eval/harness_<model>_<method>_<bits>.json)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point; exits with status 2 and a one-paragraph message on an input/offline error."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lm_eval", "lm-eval", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from experiments.run import ModelUnavailableError, pick_device

    try:
        return _main(args, pick_device)
    except (ValueError, ConfigError, HarnessUnavailableError, DataUnavailableError, ModelUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _main(args: argparse.Namespace, pick_device: Any) -> dict[str, Any]:
    from lowra.atomic import write_text_atomic

    names = [] if args.tasks.strip() == "none" else expand_tasks(args.tasks)
    window = args.window or None
    if window is None and not names:
        raise ValueError("nothing to evaluate: --tasks none and --window 0")
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
    out = Path(args.out) if args.out else default_output(info)
    write_text_atomic(out, json.dumps(results, indent=1, default=str) + "\n")
    print(results_table(results))
    print(f"\n(results: {out})")
    return results


if __name__ == "__main__":  # pragma: no cover
    main()
