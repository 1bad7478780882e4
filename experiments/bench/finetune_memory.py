"""Peak host RSS of the runner's fine-tune and evaluate stages, and what each memory option costs in time.

    python -m experiments.bench.finetune_memory --quantized <run_dir>/model [--steps 3 --rounds 5]

``--quantized`` is a saved quantized model (``<run_dir>/model`` of ``python -m experiments.run
+model=smollm2_135m +bits=2 …``). The run's config is composed again from ``--overrides`` (default
``+model=smollm2_135m +bits=2``) with, per configuration,

* ``baseline``: ``model.gradient_checkpointing=false model.loss_chunk_tokens=null`` (full logits);
* ``checkpointing``: each decoder layer keeps only its input, the rest is recomputed in the backward;
* ``chunked CE``: the LM head + cross-entropy run ``--chunk`` tokens at a time (train and eval);
* ``both``: the two together.

Each configuration runs in a fresh interpreter that loads the tokenizer, the data and the quantized
model, then runs the runner's own stages with the runner's functions: ``train`` (``train.max_steps``
= ``--steps``) and ``evaluate`` (the held-out perplexity), each stage's peak RSS measured as the
runner does (``lowra.streaming.PeakMemory``: VmHWM reset at the stage's start). After the stages it
counts the bytes saved for the backward by one micro-batch (``saved_tensors_hooks``: the activations)
and names the logits' size, so the table says where the memory goes.

Step time: one more interpreter runs forward + backward of one training micro-batch (and one eval
batch) for every configuration in turn, ``--rounds`` times (interleaved, so load from other processes
hits all alike), and reports each configuration's median over the baseline's. Threads: ``--threads``
(1 by default: on a shared 2-core machine two threads spin against other processes and run 10-25×
slower). Prints a table, writes ``results/bench/finetune_memory_smollm2.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {  # name: (model.gradient_checkpointing, chunked loss)
    "baseline": (False, False),
    "checkpointing": (True, False),
    "chunked CE": (False, True),
    "both": (True, True),
}
GB = 1e9


def _compose(overrides: list[str], checkpointing: bool, chunk: int | None, steps: int) -> Any:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from experiments.runner.config_check import CONF_DIR

    extra = [f"model.gradient_checkpointing={str(checkpointing).lower()}",
             f"model.loss_chunk_tokens={chunk if chunk else 'null'}", f"train.max_steps={steps}", "logger=none"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=[*overrides, *extra])
    OmegaConf.resolve(cfg)
    return cfg


def _load(cfg: Any, quantized: str) -> tuple[Any, Any, Any]:
    """(tokenizer, data, quantized model with ``model.gradient_checkpointing`` applied), as the runner has them."""
    from experiments.runner.data import load_data
    from experiments.runner.setup import apply_checkpointing, load_tokenizer
    from lowra import load_quantized

    tokenizer = load_tokenizer(cfg.model)
    data = load_data(cfg.data, tokenizer, need_train=True)
    model = load_quantized(quantized, device="cpu")
    apply_checkpointing(model, cfg.model)  # as experiments.runner.run does
    return tokenizer, data, model


def _batches(cfg: Any, data: Any) -> Any:
    from experiments.runner.data import pack_blocks
    from experiments.runner.train import LMBatches

    return LMBatches(pack_blocks(data.train_ids, int(cfg.train.seq_len)), int(cfg.train.batch_size),
                     int(cfg.train.seed))


def _saved_for_backward(model: Any, batch: dict, chunk: int | None) -> dict[str, int]:
    """Bytes kept for the backward by one micro-batch's loss, and the largest such tensor."""
    import torch

    from experiments.runner.chunked_loss import model_loss

    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel() * t.element_size())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model_loss(model, batch, chunk)
    del loss
    model.eval()
    return {"saved_for_backward_bytes": sum(sizes), "largest_saved_bytes": max(sizes)}


def child_memory(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration's fine-tune and evaluate stages in this interpreter (``--child NAME``)."""
    import torch

    from experiments.eval.evaluate import evaluate
    from experiments.runner.setup import trainable_parameters
    from experiments.runner.train import TrainOptions, train
    from lowra.streaming import PeakMemory, current_rss

    torch.set_num_threads(args.threads)
    checkpointing, chunked = CONFIGS[args.child]
    chunk = args.chunk if chunked else None
    cfg = _compose(args.overrides, checkpointing, chunk, args.steps)
    tokenizer, data, model = _load(cfg, args.quantized)
    batches = _batches(cfg, data)
    peaks = PeakMemory(release=True)  # as the runner's
    rss_ready = current_rss()
    with tempfile.TemporaryDirectory() as ckpt, peaks.stage("fine-tune"):
        train(model, trainable_parameters(model), batches, Path(ckpt),
              TrainOptions(cfg.train, progress=False, loss_chunk_tokens=cfg.model.loss_chunk_tokens))
    with peaks.stage("evaluate"):
        ppl = evaluate(model, tokenizer, data, cfg, "cpu", "eval", progress=False)["ppl"]
    stages = peaks.to_dict()["stages"]
    tokens = int(cfg.train.batch_size) * int(cfg.train.seq_len)
    eval_tokens = int(cfg.eval.batch_size) * int(cfg.eval.window)
    vocab = int(model.config.vocab_size)
    return {
        "config": args.child, "gradient_checkpointing": checkpointing, "loss_chunk_tokens": chunk,
        "rss_ready_bytes": rss_ready, "peak_resettable": peaks.peak_resettable,
        "fine_tune_peak_rss_bytes": stages["fine-tune"]["peak_rss_bytes"],
        "evaluate_peak_rss_bytes": stages["evaluate"]["peak_rss_bytes"],
        "fine_tune_time_s": stages["fine-tune"]["time_s"], "evaluate_time_s": stages["evaluate"]["time_s"],
        "ppl_after": ppl, "train_tokens_per_micro_batch": tokens, "eval_tokens_per_batch": eval_tokens,
        "train_logits_fp32_bytes": tokens * vocab * 4, "eval_logits_fp32_bytes": eval_tokens * vocab * 4,
        **_saved_for_backward(model, batches.get(0), chunk),
    }


def _time_train(model: Any, batch: dict, checkpointing: bool, chunk: int | None) -> float:
    from omegaconf import OmegaConf

    from experiments.runner.chunked_loss import model_loss
    from experiments.runner.setup import apply_checkpointing

    if checkpointing:
        apply_checkpointing(model, OmegaConf.create({"gradient_checkpointing": True}))
    else:
        model.activation_checkpointing_disable()
    model.train()
    t0 = time.perf_counter()
    model_loss(model, batch, chunk).backward()
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    model.eval()
    return dt


def _time_eval(model: Any, ids: Any, chunk: int | None) -> float:
    from experiments.runner.chunked_loss import token_nll

    t0 = time.perf_counter()
    token_nll(model, ids, chunk)
    return time.perf_counter() - t0


def child_timing(args: argparse.Namespace) -> dict[str, Any]:
    """Forward + backward of one micro-batch and one eval batch per configuration, interleaved (``--child timing``)."""
    import torch

    torch.set_num_threads(args.threads)
    cfg = _compose(args.overrides, False, None, args.steps)
    _, data, model = _load(cfg, args.quantized)
    batch = _batches(cfg, data).get(0)
    window, bs = int(cfg.eval.window), int(cfg.eval.batch_size)
    ids = data.eval_ids[: window * bs].view(bs, window)
    train_s: dict[str, list[float]] = {k: [] for k in CONFIGS}
    eval_s: dict[str, list[float]] = {"full logits": [], "chunked": []}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, (ckpt, chunked) in CONFIGS.items():
            dt = _time_train(model, batch, ckpt, args.chunk if chunked else None)
            if r:
                train_s[name].append(dt)
        for name, chunk in (("full logits", None), ("chunked", args.chunk)):
            dt = _time_eval(model, ids, chunk)
            if r:
                eval_s[name].append(dt)
    base, ebase = statistics.median(train_s["baseline"]), statistics.median(eval_s["full logits"])
    return {
        "threads": torch.get_num_threads(), "rounds": args.rounds,
        "train_step": {k: {"median_s": statistics.median(v), "ratio_vs_baseline": statistics.median(v) / base,
                           "rounds_s": v} for k, v in train_s.items()},
        "eval_batch": {k: {"median_s": statistics.median(v), "ratio_vs_full": statistics.median(v) / ebase,
                           "rounds_s": v} for k, v in eval_s.items()},
    }


def _run_child(args: argparse.Namespace, name: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "experiments.bench.finetune_memory", "--child", name, "--quantized", args.quantized,
           "--steps", str(args.steps), "--rounds", str(args.rounds), "--chunk", str(args.chunk),
           "--threads", str(args.threads), "--overrides", *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _table(result: dict[str, Any]) -> str:
    t = result["timing"]["train_step"]
    lines = [f"{'config':<14} {'fine-tune GB':>12} {'evaluate GB':>12} {'ready GB':>9} {'saved bwd MB':>13} "
             f"{'step × base':>12}"]
    for row in result["rows"]:
        lines.append(f"{row['config']:<14} {row['fine_tune_peak_rss_bytes'] / GB:>12.2f} "
                     f"{row['evaluate_peak_rss_bytes'] / GB:>12.2f} {row['rss_ready_bytes'] / GB:>9.2f} "
                     f"{row['saved_for_backward_bytes'] / 1e6:>13.0f} {t[row['config']]['ratio_vs_baseline']:>12.2f}")
    e = result["timing"]["eval_batch"]
    lines.append(f"eval batch: chunked {e['chunked']['ratio_vs_full']:.2f}× full logits "
                 f"({e['full logits']['median_s']:.2f} s full)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantized", required=True, help="a saved quantized model (<run_dir>/model)")
    parser.add_argument("--overrides", nargs="*", default=["+model=smollm2_135m", "+bits=2"])
    parser.add_argument("--steps", type=int, default=3, help="fine-tune steps per configuration (train.max_steps)")
    parser.add_argument("--chunk", type=int, default=256, help="model.loss_chunk_tokens of the chunked configs")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "results" / "bench" / "finetune_memory_smollm2.json"))
    args = parser.parse_args(argv)
    if args.child is not None:  # one measurement in this interpreter: its JSON is the last stdout line
        res = child_timing(args) if args.child == "timing" else child_memory(args)
        print(json.dumps(res))
        return res
    load = {"before": _load_average()}
    rows = [_run_child(args, name) for name in CONFIGS]
    timing = _run_child(args, "timing")
    load["after"] = _load_average()
    result = {"quantized": args.quantized, "overrides": args.overrides, "steps": args.steps, "chunk": args.chunk,
              "threads": args.threads, "load_average_1_5_15": load, "target": "every stage's peak RSS <= 2 GB",
              "rows": rows, "timing": timing}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(_table(result))
    print(f"load average {load}; wrote {out}")
    return result


if __name__ == "__main__":
    main()
