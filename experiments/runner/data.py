"""Real data for the runner: local files and Hugging Face Hub datasets, no synthetic text.

Three loaders (``data.loader`` in ``conf/data/*.yaml``):

* ``story_file`` — one local text file of blank-line separated stories (TinyStories). Split
  deterministically *by story*: the last ``heldout_fraction`` of the stories in file order are
  held out for evaluation, the rest are the fine-tuning set.
* ``hub_text`` — ``datasets.load_dataset(hub_path, hub_name, split=…)[text_field]`` (WikiText-2,
  OASST1 guanaco), or local files named by ``data.local.train`` / ``data.local.eval``.
* ``hub_summarization`` — (``source_field``, ``target_field``) pairs (XSUM, CNN/DailyMail).

Language-modelling text becomes one token stream ``[N]`` (int64): with ``join`` null, each
document is ``BOS + document (+ EOS when add_eos)``; with a ``join`` string the documents are
joined into one text tokenized once after a single BOS (the usual WikiText-2 convention).
Training cuts the stream into packed blocks ``[seq_len]``. Offline, a Hub dataset fails with a
:class:`DataUnavailableError` saying which ``data.local.*`` key to set.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experiments.runner.config_check import resolve_path

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".raw", ".text")
TABLE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataUnavailableError(RuntimeError):
    """A dataset that cannot be read (offline Hub, missing file), with how to fix it."""


@dataclass
class LMData:
    """Token streams for causal language modelling.

    Attributes:
        train_ids: int64 ``[N_train]`` fine-tuning stream, or None when not needed.
        eval_ids: int64 ``[N_eval]`` held-out stream (perplexity).
        sources: where each part came from (file or hub id), for results.json.
    """

    train_ids: torch.Tensor | None
    eval_ids: torch.Tensor
    sources: dict[str, str] = field(default_factory=dict)


@dataclass
class SummarizationData:
    """(source, target) text pairs; ``train`` is None when not needed."""

    train: list[tuple[str, str]] | None
    eval: list[tuple[str, str]]
    sources: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- reading


def split_stories(text: str) -> list[str]:
    """Blank-line separated stories, stripped, empty ones dropped (file order kept)."""
    return [s.strip() for s in text.replace("\r\n", "\n").split("\n\n") if s.strip()]


def split_heldout(items: list[Any], heldout_fraction: float) -> tuple[list[Any], list[Any]]:
    """Deterministic split: the last ``ceil(fraction · n)`` items are held out."""
    n_heldout = max(1, math.ceil(len(items) * heldout_fraction))
    if n_heldout >= len(items):
        raise DataUnavailableError(
            f"data.heldout_fraction={heldout_fraction} leaves no training items out of {len(items)}"
        )
    return items[:-n_heldout], items[-n_heldout:]


def _hub_hint(data_cfg: Any, role: str) -> str:
    what = (
        f"a table (.json/.jsonl/.parquet/.csv) with columns "
        f"'{data_cfg.source_field}' and '{data_cfg.target_field}'"
        if data_cfg.task == "summarization"
        else f"a text file (.txt/.raw) or a table with a '{data_cfg.text_field}' column"
    )
    return (
        f"To run offline, download it elsewhere and point the config at local files: "
        f"data.local.{role}=/path/to/file ({what})."
    )


def load_hub_split(data_cfg: Any, split: str, role: str) -> Any:
    """``datasets.load_dataset(hub_path, hub_name, split=split)`` with an actionable error."""
    import datasets

    from experiments.runner.hub import no_network_reason, offline_mode

    reason = no_network_reason()
    if reason is not None and not offline_mode() and os.environ.get("HF_DATASETS_OFFLINE", "").upper() not in (
        "1", "ON", "YES", "TRUE"
    ):  # fail now instead of after a minute of retries
        raise DataUnavailableError(
            f"data={data_cfg.name}: cannot load the '{split}' split of '{data_cfg.hub_path}' from the Hugging "
            f"Face Hub: {reason}. If it is in the local cache, set HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1. "
            f"{_hub_hint(data_cfg, role)}"
        )
    try:
        return datasets.load_dataset(data_cfg.hub_path, data_cfg.hub_name, split=split)
    except Exception as exc:  # offline: ConnectionError / OSError / DatasetNotFoundError …
        raise DataUnavailableError(
            f"data={data_cfg.name}: could not load the '{split}' split of "
            f"'{data_cfg.hub_path}'{'/' + str(data_cfg.hub_name) if data_cfg.hub_name else ''} "
            f"from the Hugging Face Hub ({type(exc).__name__}: {exc}). {_hub_hint(data_cfg, role)}"
        ) from exc


def load_local_table(path: Path) -> Any:
    """A local json/jsonl/parquet/csv file as a ``datasets.Dataset``."""
    import datasets

    builder = TABLE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataUnavailableError(
            f"{path}: unsupported file type {path.suffix!r}; use one of "
            f"{sorted(set(TABLE_BUILDERS) | set(TEXT_SUFFIXES))}"
        )
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def _column(table: Any, name: str, where: str) -> list[str]:
    if name not in table.column_names:
        raise DataUnavailableError(f"{where}: no column '{name}' (columns: {table.column_names})")
    return [str(x) for x in table[name]]


def read_documents(data_cfg: Any, role: str) -> tuple[list[str], str]:
    """The text documents for ``role`` ('train' or 'eval') of an lm dataset, and their source."""
    if data_cfg.loader == "story_file":
        path = resolve_path(data_cfg.local[role])
        stories = split_stories(path.read_text(encoding="utf-8"))
        train, heldout = split_heldout(stories, float(data_cfg.heldout_fraction))
        part = train if role == "train" else heldout
        return part, f"{path} ({'first' if role == 'train' else 'last'} {len(part)} stories)"
    local = data_cfg.local[role]
    if local:
        path = resolve_path(local)
        if path.suffix.lower() in TEXT_SUFFIXES:
            return [path.read_text(encoding="utf-8")], str(path)
        return _column(load_local_table(path), data_cfg.text_field, str(path)), str(path)
    split = data_cfg.train_split if role == "train" else data_cfg.eval_split
    try:
        table = load_hub_split(data_cfg, split, role)
    except DataUnavailableError:
        fallback = data_cfg.local.get("eval_fallback") if role == "eval" else None
        if not fallback:
            raise
        path = resolve_path(fallback)
        log.warning("data=%s: Hub unavailable, evaluating on the local copy %s", data_cfg.name, path)
        return [path.read_text(encoding="utf-8")], f"{path} (offline fallback)"
    hub = f"hub:{data_cfg.hub_path}{'/' + str(data_cfg.hub_name) if data_cfg.hub_name else ''}"
    return _column(table, data_cfg.text_field, hub), f"{hub}[{split}]"


def read_pairs(data_cfg: Any, role: str) -> tuple[list[tuple[str, str]], str]:
    """(source, target) pairs for ``role`` of a summarization dataset, and their source."""
    local = data_cfg.local[role]
    if local:
        path = resolve_path(local)
        table, where = load_local_table(path), str(path)
    else:
        split = data_cfg.train_split if role == "train" else data_cfg.eval_split
        table = load_hub_split(data_cfg, split, role)
        where = f"hub:{data_cfg.hub_path}[{split}]"
    sources = _column(table, data_cfg.source_field, where)
    targets = _column(table, data_cfg.target_field, where)
    return list(zip(sources, targets, strict=True)), where


# ------------------------------------------------------------------------------------ tokenization


def tokenize_stream(tokenizer: Any, docs: list[str], join: str | None, add_eos: bool) -> torch.Tensor:
    """One int64 token stream ``[N]`` from documents (see the module docstring)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    if join is not None:
        docs = [join.join(docs)]
    ids: list[int] = []
    for chunk in _batched(docs, 1024):
        for doc_ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(bos)
            ids.extend(doc_ids)
            ids.extend(eos)
    return torch.tensor(ids, dtype=torch.long)


def _batched(items: list[str], n: int) -> list[list[str]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def pack_blocks(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping blocks ``[n_blocks, seq_len]`` of a stream ``[N]`` (remainder dropped)."""
    n_blocks = stream.numel() // seq_len
    if n_blocks == 0:
        raise DataUnavailableError(f"the training stream has {stream.numel()} tokens < seq_len={seq_len}")
    return stream[: n_blocks * seq_len].view(n_blocks, seq_len)


# ----------------------------------------------------------------------------------------- entry


def load_data(data_cfg: Any, tokenizer: Any, need_train: bool) -> LMData | SummarizationData:
    """Evaluation data always, training data when ``need_train`` (offline-safe for eval-only)."""
    if data_cfg.task == "summarization":
        eval_pairs, eval_src = read_pairs(data_cfg, "eval")
        train_pairs, train_src = read_pairs(data_cfg, "train") if need_train else (None, "")
        return SummarizationData(train_pairs, eval_pairs, {"eval": eval_src, "train": train_src})
    add_eos = bool(data_cfg.get("add_eos", False))
    eval_docs, eval_src = read_documents(data_cfg, "eval")
    eval_ids = tokenize_stream(tokenizer, eval_docs, data_cfg.join, add_eos)
    train_ids, train_src = None, ""
    if need_train:
        train_docs, train_src = read_documents(data_cfg, "train")
        train_ids = tokenize_stream(tokenizer, train_docs, data_cfg.join, add_eos)
    return LMData(train_ids, eval_ids, {"eval": eval_src, "train": train_src})
