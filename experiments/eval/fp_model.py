"""fp32 perplexity and greedy text of a prepared model (``make assets``), to check a conversion.

``python -m experiments.eval.fp_model PATH [--max-tokens N]`` prints JSON: perplexity on the shared
TinyStories validation file and the WikiText-2 raw test file, plus 48 greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from experiments.eval.evaluate import perplexity
from experiments.runner.data import split_stories, tokenize_stream


def evaluate_fp32(path: Path, max_tokens: int | None = None, window: int = 512) -> dict[str, Any]:
    """fp32 perplexity of the prepared model over disjoint ``window``-token windows on the shared
    TinyStories file (each story as BOS + story, as ``data=tinystories`` tokenizes it) and the
    WikiText-2 raw test file (lines joined with "\\n\\n" after one BOS, as ``data=wikitext2``'s
    offline fallback), plus 48 greedy tokens after "Once upon a time"."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = Path(os.environ.get("LOWRA_ASSETS") or Path(__file__).resolve().parents[3] / "shared" / "assets")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stories = split_stories((assets / "corpora" / "tinystories_valid.txt").read_text())
    wiki = [ln for ln in (assets / "corpora" / "wikitext2_raw_test.txt").read_text().splitlines() if ln.strip()]
    streams = {"tinystories": tokenize_stream(tok, stories, None, False),
               "wikitext2": tokenize_stream(tok, wiki, "\n\n", False)}
    result: dict[str, Any] = {}
    with torch.no_grad():
        for key, stream in streams.items():
            t0 = time.perf_counter()
            r = perplexity(model, stream, window=window, stride=window, max_tokens=max_tokens, batch_size=4,
                           desc=key, progress=sys.stderr.isatty())
            result[key] = {**r, "seconds": round(time.perf_counter() - t0, 1)}
        ids = tok("Once upon a time", return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=48, do_sample=False)
    result["greedy"] = tok.decode(gen[0], skip_special_tokens=True)
    return result




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path,
                        help="a prepared model folder, e.g. ~/.cache/lowra/models/SmolLM2-135M-Instruct")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per corpus (default: all)")
    args = parser.parse_args(argv)
    print(json.dumps(evaluate_fp32(args.path, max_tokens=args.max_tokens), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
