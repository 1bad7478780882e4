"""Benchmark: streaming quantization (``lowra.quantize_pretrained``) vs the in-memory path.

``python -m experiments.bench.streaming`` writes a synthetic Llama checkpoint with real-width layers
(random weights; default hidden 2048, FFN 5632, 8 layers, 16 heads, tied 32k vocabulary, fp32
safetensors shards of ≤ 512 MB) under ``/tmp``, then runs, each in a fresh interpreter:

* ``stream``: ``quantize_pretrained(checkpoint, out, config, calibration=...)`` — peak host RSS above
  the footprint after imports (and a warm-up that loads the CPU kernels and the planner's solver), time, per-stage
  breakdown; then it loads the result with ``load_quantized`` and runs a forward (finite logits?).
* ``memory``: ``from_pretrained`` + ``quantize_model`` + ``save_quantized`` with the same options —
  the same peak/time measurement.

Finally both saved checkpoints are compared tensor by tensor (codes, codebooks, scales, plan).
Prints a table and writes ``results/bench/streaming.json``. Threads are pinned to one
(``OMP_NUM_THREADS=1``). The config is ``LowRAConfig()`` at 2 bits (``--preset default``: K-FAC
table, calibrated init, with 64 seeded random token windows of 256 — the runner's calibration shape;
the weights are random, so no text means more) or the paper preset (``--preset paper``, data-free);
``--codebook-iters 3`` keeps the run short on a loaded 2-core machine; both paths run the same options.

The check (issue 19): peak host memory above the post-import footprint ≤ 35 % of the checkpoint's
size, finite logits after reload, streaming time ≤ 1.25 × the in-memory path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------- checkpoint
def llama_tensor_shapes(hidden: int, ffn: int, layers: int, vocab: int, heads: int, kv_heads: int,
                        tied: bool) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor of a ``LlamaForCausalLM`` checkpoint, in module order."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.mlp.gate_proj.weight", (ffn, hidden)),
            (f"{p}.mlp.up_proj.weight", (ffn, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, ffn)),
        ]
    out.append(("model.norm.weight", (hidden,)))
    if not tied:
        out.append(("lm_head.weight", (vocab, hidden)))
    return out


def write_synthetic_llama(
    directory: str | os.PathLike,
    hidden: int = 2048,
    ffn: int = 5632,
    layers: int = 8,
    vocab: int = 32000,
    heads: int = 16,
    kv_heads: int = 16,
    tied: bool = True,
    max_shard_bytes: int = 512 << 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a random-weight Llama checkpoint (``config.json`` + fp32 shards + index); return its facts.

    Linear and embedding weights are N(0, 0.02²), norms 1. Only one shard is in memory at a time.
    An existing checkpoint with the same ``lowra_synthetic`` description is reused.
    """
    import torch
    from transformers import LlamaConfig

    from lowra.atomic import write_text_atomic
    from lowra.format import save_safetensors_atomic

    directory = Path(directory)
    spec = dict(hidden=hidden, ffn=ffn, layers=layers, vocab=vocab, heads=heads, kv_heads=kv_heads, tied=tied,
                max_shard_bytes=max_shard_bytes, seed=seed)
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        if index.get("metadata", {}).get("lowra_synthetic") == json.dumps(spec, sort_keys=True):
            return _facts(directory, index)
    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
        max_position_embeddings=2048, dtype="float32",
    )
    config.architectures = ["LlamaForCausalLM"]
    write_text_atomic(directory / "config.json", config.to_json_string())
    gen = torch.Generator().manual_seed(seed)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in llama_tensor_shapes(hidden, ffn, layers, vocab, heads, kv_heads, tied):
        nbytes = 4 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, entries in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in entries:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape)
            else:
                tensors[name] = torch.randn(shape, generator=gen) * 0.02
            weight_map[name] = fname
            total += 4 * tensors[name].numel()
        save_safetensors_atomic(tensors, directory / fname, {"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total, "lowra_synthetic": json.dumps(spec, sort_keys=True)},
             "weight_map": weight_map}
    write_text_atomic(index_path, json.dumps(index, indent=1))
    return _facts(directory, index)


def _facts(directory: Path, index: dict[str, Any]) -> dict[str, Any]:
    files = sorted(set(index["weight_map"].values()))
    nbytes = sum((directory / f).stat().st_size for f in files)
    return {"dir": str(directory), "shards": len(files), "bytes": nbytes,
            "params": index["metadata"]["total_size"] // 4, "spec": json.loads(index["metadata"]["lowra_synthetic"])}


# ---------------------------------------------------------------------------------- workers
def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``LowRAConfig`` fields both paths run with: ``--preset default`` is ``LowRAConfig()`` (K-FAC
    table, calibrated init: calibration windows needed), ``paper`` the paper preset (data-free)."""
    fields = dict(bits=args.bits, rank=args.rank, alpha=float(args.rank), loftq_iters=args.loftq_iters,
                  codebook_iters=args.codebook_iters, plan_options={"max_nodes": 1000})
    if args.preset == "paper":
        from lowra.config import PAPER

        fields.update(PAPER)
    return fields


def _calibration(args: argparse.Namespace, vocab: int) -> Any:
    """Seeded random token windows ``[calib_samples, calib_seq_len]`` (the synthetic model has random
    weights: no text is more meaningful; the shapes are the runner's recipe, 64 × 256), or None when
    the preset needs none."""
    import torch

    from lowra.config import LowRAConfig

    config = LowRAConfig(**_options(args))
    if not config.method_object.needs(config).any:
        return None
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (args.calib_samples, args.calib_seq_len), generator=gen)


def _warm_up() -> None:
    """Load what both paths use lazily (C++ CPU kernels, planner solver) before the baseline."""
    import torch

    import lowra
    from lowra.codebook import learn_codebooks
    from lowra.format import QuantizedTensor

    w = torch.randn(64, 256)
    r = learn_codebooks(w, bits=(1, 2, 4), iters=1)
    bits = torch.tensor([1, 2, 4] * 21 + [1])
    QuantizedTensor.from_codebooks(w, bits, r.codebooks, 64, False).dequantize(torch.float32)
    lowra.assign_precision(r.error.numpy(), [256] * 64, 1.5, candidates=(1, 2, 4))
    # the model classes transformers imports lazily (both paths build the same architecture)
    from transformers import AutoModelForCausalLM, LlamaConfig

    import lowra.checkpoint

    with torch.device("meta"):
        AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=4))


def worker(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measured run (``stream`` or ``memory``) in this process; returns its record."""
    import torch

    import lowra
    from lowra.streaming import PeakMemory, current_rss, peak_rss, quantize_pretrained, reset_peak_rss

    torch.set_num_threads(1)
    _warm_up()
    from transformers import AutoModelForCausalLM

    baseline = current_rss()
    resettable = reset_peak_rss()
    out = Path(args.work) / f"out_{mode}"
    config = lowra.LowRAConfig(**_options(args))
    vocab = json.loads((Path(args.checkpoint) / "config.json").read_text())["vocab_size"]
    calibration = _calibration(args, vocab)
    rec: dict[str, Any] = {"mode": mode, "rss_after_imports_bytes": baseline, "peak_resettable": resettable}
    torch.manual_seed(0)
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "stream":
        res = quantize_pretrained(args.checkpoint, out, config, calibration=calibration, dtype=torch.float32,
                                  progress=args.progress)
        rec["stages"] = res.stages
        rec["resumed"] = res.resumed
    else:
        peaks = PeakMemory()
        with peaks.stage("load"):
            model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
        with peaks.stage("quantize_model"):
            report = lowra.quantize_model(model, config, calibration=calibration, progress=args.progress)
        with peaks.stage("save"):
            lowra.save_quantized(model, out, report=report, source_model=str(args.checkpoint))
        del model
        rec["stages"] = peaks.to_dict()["stages"]
    rec["time_s"] = time.perf_counter() - t0
    rec["cpu_s"] = time.process_time() - c0  # user + sys of this process: comparable on a loaded machine
    # per-stage peaks reset VmHWM: the run's peak is the largest stage peak
    rec["peak_rss_bytes"] = max([s["peak_rss_bytes"] for s in rec["stages"].values()] + [peak_rss()])
    rec["peak_above_imports_bytes"] = rec["peak_rss_bytes"] - baseline
    if mode == "stream":
        model = lowra.load_quantized(out, verify=True)
        x = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(x).logits
        rec["forward_finite"] = bool(torch.isfinite(logits).all())
        rec["logits_shape"] = list(logits.shape)
    return rec


def compare_checkpoints(a: Path, b: Path) -> dict[str, Any]:
    """Do two quantized saves hold the same codes, codebooks, scales and plans (and adapters)?"""
    import torch

    import lowra

    ma, mb = lowra.load_quantized(a, verify=False), lowra.load_quantized(b, verify=False)
    la, lb = dict(lowra.lowra_layers(ma)), dict(lowra.lowra_layers(mb))
    if la.keys() != lb.keys():
        return {"codes_identical": False, "why": "different layers"}
    codes = adapters = True
    n_tensors = 0
    for name in la:
        sa, sb = la[name].qweight.state_dict(), lb[name].qweight.state_dict()
        codes &= sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        n_tensors += len(sa)
        if la[name].rank:
            adapters &= torch.equal(la[name].lora_A, lb[name].lora_A) and torch.equal(la[name].lora_B, lb[name].lora_B)
    return {"codes_identical": bool(codes), "adapters_identical": bool(adapters), "layers": len(la),
            "tensors_compared": n_tensors}


# ---------------------------------------------------------------------------------- main
def _run_worker(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.work) / f"{mode}.json"
    cmd = [sys.executable, "-m", "experiments.bench.streaming", "--worker", mode, "--checkpoint", str(args.checkpoint),
           "--work", str(args.work), "--bits", str(args.bits), "--rank", str(args.rank),
           "--codebook-iters", str(args.codebook_iters), "--loftq-iters", str(args.loftq_iters),
           "--preset", args.preset, "--calib-samples", str(args.calib_samples),
           "--calib-seq-len", str(args.calib_seq_len), "--worker-out", str(out)]
    cmd += ["--progress"] if args.progress else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return json.loads(out.read_text())


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "lowra_synth_llama")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lowra_bench_streaming")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--untied", action="store_true", help="separate lm_head (default: tied embeddings)")
    p.add_argument("--preset", choices=("default", "paper"), default="default",
                   help="default: LowRAConfig() (K-FAC + calibrated init, calibration windows); paper: data-free")
    p.add_argument("--bits", type=float, default=2.0)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--codebook-iters", type=int, default=3)
    p.add_argument("--loftq-iters", type=int, default=1)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--progress", action="store_true", help="progress lines of the stages (to stderr)")
    p.add_argument("--skip-memory", action="store_true", help="skip the in-memory comparison run")
    p.add_argument("--json", type=Path, default=REPO / "results" / "bench" / "streaming.json")
    p.add_argument("--worker", choices=("stream", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        rec = worker(args.worker, args)
        from lowra.atomic import write_text_atomic

        write_text_atomic(args.worker_out, json.dumps(rec, indent=1))
        return None

    import shutil

    args.work.mkdir(parents=True, exist_ok=True)
    for mode in ("stream", "memory"):
        shutil.rmtree(args.work / f"out_{mode}", ignore_errors=True)
    t0 = time.perf_counter()
    facts = write_synthetic_llama(args.checkpoint, args.hidden, args.ffn, args.layers, args.vocab, args.heads,
                                  args.kv_heads, tied=not args.untied)
    facts["write_s"] = time.perf_counter() - t0
    runs = {"stream": _run_worker("stream", args)}
    if not args.skip_memory:
        runs["memory"] = _run_worker("memory", args)
    same = compare_checkpoints(args.work / "out_stream", args.work / "out_memory") if "memory" in runs else None
    size = facts["bytes"]
    s = runs["stream"]
    checks = {
        "peak_above_imports_fraction": s["peak_above_imports_bytes"] / size,
        "peak_ok": s["peak_above_imports_bytes"] <= 0.35 * size,
        "forward_finite": s["forward_finite"],
    }
    if "memory" in runs:
        checks["time_ratio"] = s["time_s"] / runs["memory"]["time_s"]
        checks["cpu_time_ratio"] = s["cpu_s"] / runs["memory"]["cpu_s"]
        checks["time_ok"] = checks["time_ratio"] <= 1.25
        checks.update(same)
    import platform

    result = {
        "checkpoint": facts,
        "options": {**_options(args), "preset": args.preset,
                    "calibration": None if _calibration(args, 2) is None else [args.calib_samples, args.calib_seq_len]},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": 1,
                    "loadavg_end": list(os.getloadavg())},
        "runs": runs,
        "checks": checks,
    }
    print(f"\ncheckpoint: {facts['params'] / 1e9:.3f} B params, {size / 2**30:.2f} GiB fp32 in {facts['shards']} "
          f"shards ({args.checkpoint})")
    print(f"{'path':8} {'stage':16} {'time s':>8} {'peak RSS MB':>12} {'above imports MB':>17} {'% of ckpt':>9}")
    for mode, rec in runs.items():
        base = rec["rss_after_imports_bytes"]
        for stage, st in rec["stages"].items():
            above = st["peak_rss_bytes"] - base
            print(f"{mode:8} {stage:16} {st['time_s']:8.1f} {_mb(st['peak_rss_bytes']):>12} {_mb(above):>17} "
                  f"{100 * above / size:8.1f}%")
        above = rec["peak_above_imports_bytes"]
        print(f"{mode:8} {'TOTAL':16} {rec['time_s']:8.1f} {_mb(rec['peak_rss_bytes']):>12} {_mb(above):>17} "
              f"{100 * above / size:8.1f}%   (CPU {rec['cpu_s']:.1f} s)")
    print("checks:", json.dumps(checks))
    from lowra.atomic import write_text_atomic

    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
