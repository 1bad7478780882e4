"""WikiText-2 test perplexity in the GPTQ convention (:func:`wikitext2_perplexity`), for
:mod:`experiments.eval.harness`.

The raw test split's rows joined with ``"\\n\\n"``, tokenized ONCE (with the tokenizer's special
tokens, as ``tokenizer(text)`` does), cut into non-overlapping ``window``-token windows (default
2048; the incomplete tail is dropped), mean NLL over every predicted token (``window - 1`` per
window) → ``exp``. Token-level; lm-eval's ``wikitext`` task reports WORD perplexity of a
differently detokenized document-level text and is not this number. The shared corpus keeps only
the non-empty rows; the empty rows of the Hub split are put back from the line layout of
``wikitext2_test.tokens`` (same 4,358 lines), so the joined text is the Hub split's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from experiments.eval.evaluate import perplexity
from experiments.eval.tasks import _assets
from experiments.runner.data import DataUnavailableError

GPTQ_CONVENTION = (
    "token-level perplexity: raw test split rows joined with '\\n\\n', tokenized once, non-overlapping "
    "windows of `window` tokens (incomplete tail dropped), exp(mean NLL over the window-1 predicted "
    "tokens of every window) — as in the GPTQ repository (IST-DASLab/gptq, datautils + *_eval)"
)


def default_wikitext() -> tuple[Path, Path]:
    corpora = _assets() / "corpora"
    return corpora / "wikitext2_raw_test.txt", corpora / "wikitext2_test.tokens"


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
