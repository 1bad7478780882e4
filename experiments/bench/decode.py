"""CPU greedy-decoding speed: a LowRA-quantized decoder vs the same model in fp32.

The model is SmolLM2-135M-Instruct itself (``--model smollm2_135m``: the fp32 checkpoint that
``make assets`` prepares; 30 layers, width 576, FFN 1536, 9 heads with 3 KV heads, vocabulary
49,152, tied embeddings), a randomly initialised Llama decoder of the same shape
(``--model synthetic-smollm2``, the default, for machines without the asset: speed does not depend
on the weights' values), or stories260K from the assets (``--model stories260K``). Every ``nn.Linear``
inside the decoder layers becomes a ``LowRALinear`` with a quantized base in the real storage
format (per-row NormalFloat codebooks stored per row, group 64, fp16 absmax of the layer's weight;
random packed codes, since speed does not depend on their values and a quantization pass over
106M weights would dominate the run; 1.5 bits = half the rows at 1 bit and half at 2,
interleaved) and rank-8 LoRA adapters; embeddings, norms and the tied LM head stay fp32.

Each configuration generates ``--new-tokens`` tokens greedily (``model.generate``, KV cache,
``do_sample=False``) from an 8-token prompt; configurations run in interleaved rounds so that load
from other processes hits all alike, and the table reports the median tokens/s over rounds and its
ratio to fp32. ``--reference`` also times the 2-bit model on the PyTorch reference kernels
(``backend="torch"``: the CPU path before ``lowra_kernels.cpu_backend``).

    .venv/bin/python -m experiments.bench.decode [--threads 1 2] [--bits 1.5 2 4] [--new-tokens 32]

``--compile`` adds fp32 and 2-bit LowRA with a static KV cache and ``torch.compile(model.forward,
fullgraph=True)`` (the first, warm-up generation compiles). ``--gemv-grain`` sets the weights per thread
of the CPU GEMV (``lowra_kernels.cpu_backend.GEMV_GRAIN``).

Writes ``results/bench/decode_cpu.json``. Targets: 2-bit ≥ fp32 tokens/s (issue 15); compiled 2-bit ≥ 2×
fp32 eager and ≥ 1× fp32 compiled tokens/s at 1 and 2 threads (issue 27).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0)


def build_model(name: str, seed: int = 0) -> nn.Module:
    """The fp32 model in eval mode (see module doc)."""
    if name == "stories260K":
        from experiments.eval.stories import load_model

        return load_model()
    if name == "smollm2_135m":
        from transformers import AutoModelForCausalLM

        from experiments.assets import missing_hint, model_dir

        path = model_dir("SmolLM2-135M-Instruct")
        if not path.is_dir():
            raise FileNotFoundError(missing_hint(path) or f"no SmolLM2 checkpoint at {path}: run `make assets`")
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if name != "synthetic-smollm2":
        raise ValueError(f"model must be 'synthetic-smollm2', 'smollm2_135m' or 'stories260K', got {name!r}")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()


def bits_per_row(out_features: int, bits: float, gen: torch.Generator) -> torch.Tensor:
    """Integer widths per row averaging ``bits`` in [1, 4]: ``⌊bits⌋`` with the fraction of rows at
    ``⌈bits⌉`` (1.5 → half 1-bit, half 2-bit; 1.15 → 15 % at 2 bits), interleaved at random."""
    if not 1 <= bits <= 4:
        raise ValueError(f"bits must lie in [1, 4], got {bits}")
    lo = int(bits)
    b = torch.full((out_features,), lo, dtype=torch.int64)
    b[: int((bits - lo) * out_features + 1e-9)] = lo + 1  # 1e-9: (1.15 - 1) * 100 = 14.999…
    return b[torch.randperm(out_features, generator=gen)]


def random_group(bits: int, rows: torch.Tensor, in_features: int, gen: torch.Generator):
    """A ``BitGroup`` of ``rows`` (int32, on their device) at ``bits`` with random packed codes (drawn on
    the CPU from ``gen``) and per-row NormalFloat codebooks: the real storage format, values that speed
    does not depend on."""
    from lowra.format import BitGroup
    from lowra.normalfloat import normal_float_table
    from lowra_kernels.layout import words_per_row

    codes = torch.randint(-2**31, 2**31 - 1, (rows.numel(), words_per_row(in_features, bits)),
                          generator=gen, dtype=torch.int64).to(device=rows.device, dtype=torch.int32)
    if bits == 3:
        codes &= (1 << 30) - 1  # 10 codes per word
    table = normal_float_table(bits).to(rows.device, torch.float16).reshape(1, -1).expand(rows.numel(), -1)
    return BitGroup(bits, rows, codes, table.contiguous())


def quantize_decoder(model: nn.Module, bits: float, rank: int, backend: str, seed: int = 0) -> nn.Module:
    """Replace every ``nn.Linear`` in the decoder layers by a quantized ``LowRALinear`` (in place), on the
    linear's device (random codes drawn on the CPU from ``seed``, so every device gets the same model)."""
    from lowra.format import QuantizedTensor
    from lowra.linear import LowRALinear
    from lowra.scales import GroupScales, compute_absmax

    gen = torch.Generator().manual_seed(seed)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    for name, linear in targets:
        w = linear.weight.detach()
        out_features, in_features = w.shape
        per_row = bits_per_row(out_features, bits, gen)
        groups = [random_group(b, (per_row == b).nonzero().flatten().to(device=w.device, dtype=torch.int32),
                               in_features, gen) for b in torch.unique(per_row).tolist()]
        scales = GroupScales.store(compute_absmax(w, 64))
        qt = QuantizedTensor((out_features, in_features), 64, groups, scales)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child,
                LowRALinear.from_linear(linear, base=qt, rank=rank, alpha=2.0 * rank, backend=backend))
    return model


def compiled(model: nn.Module) -> nn.Module:
    """``model`` generating with a static KV cache and a forward compiled whole (inductor, no graph break)."""
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False)
    model.generation_config.cache_implementation = "static"
    return model


def gemv_layers(model: nn.Module) -> list[tuple[object, torch.Tensor]]:
    """One ``(PackedWeight, x [1, in])`` per distinct layer shape of a quantized decoder (its first block's
    linears): the GEMVs a decode step runs, for timing them alone (``gemv_us``)."""
    from lowra.linear import LowRALinear

    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, LowRALinear) and m.is_quantized and (m.out_features, m.in_features) not in seen:
            seen.add((m.out_features, m.in_features))
            out.append((m._packed, torch.randn(1, m.in_features)))
    return out


def gemv_us(layers: list[tuple[object, torch.Tensor]], reps: int) -> float:
    """Median µs of one pass of the fused CPU GEMV (M = 1, no adapters) over ``layers``."""
    from lowra_kernels.cpu_backend import lut_lora_gemv_cpu

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for w, x in layers:
            lut_lora_gemv_cpu(x, w, None, None, 0.0, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def tokens_per_second(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy generation speed (prompt prefill included) in new tokens per second."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        elapsed = time.perf_counter() - t0
    if out.shape[1] != prompt.shape[1] + new_tokens:
        raise RuntimeError(f"generated {out.shape[1] - prompt.shape[1]} tokens, wanted {new_tokens}")
    return new_tokens / elapsed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="synthetic-smollm2",
                        choices=["synthetic-smollm2", "smollm2_135m", "stories260K"])
    parser.add_argument("--bits", type=float, nargs="+", default=[1.5, 2.0, 4.0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reference", action="store_true", help="also time 2-bit on the reference kernels")
    parser.add_argument("--compile", action="store_true",
                        help="also fp32 and 2-bit LowRA with a compiled forward (inductor) and a static KV cache")
    parser.add_argument("--gemv-grain", type=int, default=None,
                        help="weights per thread of the CPU GEMV (lowra_kernels.cpu_backend.GEMV_GRAIN)")
    parser.add_argument("--gemv-reps", type=int, default=50,
                        help="after each 2-bit generation, time the fused GEMV alone over the model's layer shapes "
                             "(M = 1) this many times; 0 skips it")
    parser.add_argument("--out", default=str(REPO / "results" / "bench" / "decode_cpu.json"))
    args = parser.parse_args(argv)

    if args.gemv_grain is not None:
        import lowra_kernels.cpu_backend as cpu_backend

        cpu_backend.GEMV_GRAIN = args.gemv_grain
    configs: dict[str, nn.Module] = {"fp32": build_model(args.model)}
    for bits in args.bits:
        configs[f"lowra {bits:g}b"] = quantize_decoder(build_model(args.model), bits, args.rank, "auto")
    if args.reference:
        configs["lowra 2b (reference kernels)"] = quantize_decoder(build_model(args.model), 2.0, args.rank, "torch")
    if args.compile:
        configs["fp32 compiled"] = compiled(build_model(args.model))
        configs["lowra 2b compiled"] = compiled(quantize_decoder(build_model(args.model), 2.0, args.rank, "auto"))
    vocab = configs["fp32"].config.vocab_size
    prompt = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    gemv = gemv_layers(configs["lowra 2b"]) if args.gemv_reps and "lowra 2b" in configs else []
    gemv_samples: dict[int, list[float]] = {t: [] for t in args.threads}
    threads_before = torch.get_num_threads()
    load_before = os.getloadavg()
    results = []
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for model in configs.values():
                # warm-up (builds the extension, fills caches, compiles): the timed length, as a static KV
                # cache is sized by it and another size would recompile inside the first timed round
                tokens_per_second(model, prompt, args.new_tokens)
            speeds: dict[str, list[float]] = {name: [] for name in configs}
            for _ in range(args.rounds):
                for name, model in configs.items():
                    speeds[name].append(tokens_per_second(model, prompt, args.new_tokens))
                    if gemv:  # the GEMVs alone, between the generations (same load)
                        gemv_samples[threads].append(gemv_us(gemv, args.gemv_reps))
            base = statistics.median(speeds["fp32"])
            for name, values in speeds.items():
                tps = statistics.median(values)
                results.append({"threads": threads, "config": name, "tokens_per_s": tps,
                                "ratio_to_fp32": tps / base, "all_tokens_per_s": values})
                print(f"{threads}t  {name:<30} {tps:7.2f} tok/s  ×{tps / base:5.2f} vs fp32", flush=True)
    finally:
        torch.set_num_threads(threads_before)
    gemv_result = {}
    if gemv:
        gemv_result = {"shapes": [list(w.shape) for w, _ in gemv], "bits": 2,
                       "us_per_pass": {str(t): statistics.median(v) for t, v in gemv_samples.items()},
                       "all_us_per_pass": {str(t): v for t, v in gemv_samples.items()}}
        base = gemv_result["us_per_pass"][str(args.threads[0])]
        for t in args.threads:
            us = gemv_result["us_per_pass"][str(t)]
            print(f"{t}t  GEMV (2 bits, M=1, {len(gemv)} shapes) {us:8.1f} us/pass  "
                  f"speed x{base / us:4.2f} vs {args.threads[0]} thread(s)", flush=True)
    result = {
        "model": args.model,
        "model_shape": {k: getattr(configs["fp32"].config, k, None) for k in SMOLLM2_135M},
        "device": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "rank": args.rank, "new_tokens": args.new_tokens, "prompt_tokens": 8,
        "rounds": args.rounds, "gemv_grain": args.gemv_grain,
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "quantized": "every nn.Linear in the decoder layers (random packed codes, per-row NF codebooks, group 64); "
                     "embeddings, norms, tied LM head fp32",
        "results": results,
        "gemv": gemv_result,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from lowra.atomic import atomic_path

    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
