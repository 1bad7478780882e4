"""lm-eval tasks of the harness (:mod:`experiments.eval.harness`): the two LOCAL tasks over the held-out
TinyStories split, written as ordinary lm-eval YAML tasks with their JSONL data
(:func:`write_local_tasks`), and task resolution (:func:`expand_tasks` for the ``local`` /
``zeroshot`` aliases, :func:`prepare_tasks` loading every task and its dataset before the model is).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.runner.data import DataUnavailableError, split_heldout, split_stories

REPO_ROOT = Path(__file__).resolve().parents[2]
ZERO_SHOT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq")
CLOZE_TASK = "lowra_tinystories_cloze"
ROLLING_TASK = "lowra_tinystories_rolling"
LOCAL_TASKS = (CLOZE_TASK, ROLLING_TASK)
TASK_ALIASES = {"zeroshot": ZERO_SHOT_TASKS, "local": LOCAL_TASKS}


def _assets() -> Path:
    return Path(os.environ.get("LOWRA_ASSETS") or (REPO_ROOT.parent / "shared" / "assets")).resolve()


def default_stories() -> Path:
    return _assets() / "corpora" / "tinystories_valid.txt"


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
    return f"""# written by experiments.eval.harness.write_local_tasks — TinyStories held-out story endings
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
    return f"""# written by experiments.eval.harness.write_local_tasks — TinyStories held-out stories, scored whole
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
    from experiments.runner.hub import no_network_reason

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
