"""GPU training-step time and peak memory: a LowRA-quantized decoder vs the same decoder in bf16 with LoRA.

Models (random weights at real shapes; speed does not depend on the values):

* ``llama7b``: a Llama-2-7B-shaped stack of ``--layers`` decoder layers (width 4096, FFN 11008,
  32 heads, vocabulary 32,000), built in bf16 on the GPU;
* ``stories260K``: the real stories260K from the assets (``$LOWRA_ASSETS``), in bf16 (tiny: this
  one measures launch overhead, not bandwidth).

Configs: ``bf16 + PEFT LoRA`` (Hugging Face PEFT ``LoraConfig`` on every decoder linear, the
reference) and ``LowRA <bits>`` (every decoder linear a ``LowRALinear`` with a quantized base in the
real storage format, per-row NormalFloat codebooks, group 64, random packed codes; fractional budgets
mix ⌊bits⌋ and ⌈bits⌉ rows, see ``experiments.bench.decode.bits_per_row``). Embeddings, norms and the
LM head stay bf16 and frozen. One step = forward + backward + AdamW on the adapters for a
``--batch × --seq`` token batch; after ``--warmup`` steps (autotuning happens there) ``--steps`` steps
are timed one by one with CUDA events and the median is reported, with its ratio to PEFT LoRA and the
peak memory over the timed steps (``torch.cuda.max_memory_allocated``) beside the memory the model
holds at rest.

Needs torch + triton + transformers + peft (no cvxpy, hydra or wandb: no planner runs)::

    python -m experiments.bench.train_step_gpu [--model llama7b --layers 4 --bits 1.15 2 4]

Writes ``results/bench/train_step_gpu.json`` (device name in it). Targets: issue 14 (a LowRA step vs
bf16 LoRA on a 7B-shaped stack and on stories260K, with peak memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch import nn

from experiments.bench.decode import quantize_decoder

REPO = Path(__file__).resolve().parents[2]
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(name: str, layers: int, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                seed: int = 0) -> nn.Module:
    """The frozen model in ``dtype`` on ``device`` (see module doc)."""
    torch.manual_seed(seed)
    if name == "stories260K":
        from experiments.eval.stories import load_model

        model = load_model(dtype).to(device)
    elif name == "llama7b":
        from transformers import LlamaConfig, LlamaForCausalLM

        with device:
            model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **LLAMA2_7B)).to(dtype)
    else:
        raise ValueError(f"model must be 'llama7b' or 'stories260K', got {name!r}")
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def peft_lora(model: nn.Module, rank: int, alpha: float) -> tuple[nn.Module, list[nn.Parameter]]:
    """Plain LoRA (PEFT) on every decoder linear of a frozen bf16 model: the reference config."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                                             target_modules=TARGETS))
    return model, [p for p in model.parameters() if p.requires_grad]


def lowra(model: nn.Module, bits: float, rank: int) -> tuple[nn.Module, list[nn.Parameter]]:
    """Every decoder linear a quantized ``LowRALinear`` (random codes, real format), adapters trainable."""
    from lowra.model_layers import lora_parameters

    model = quantize_decoder(model, bits, rank, "auto")
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return model, params


def _step_fn(model: nn.Module, params: list[nn.Parameter], batch: torch.Tensor):
    """One training step (forward, backward, AdamW on the adapters) as a closure."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_steps(model: nn.Module, params: list[nn.Parameter], batch: torch.Tensor, warmup: int,
               steps: int) -> dict:
    """Median step time (ms, CUDA events) and peak memory over the timed steps (GiB); on a CPU (the
    smoke test) wall-clock time and no memory figures."""
    step = _step_fn(model, params, batch)
    for _ in range(warmup):
        step()
    if not batch.is_cuda:
        import time

        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return {"step_ms": statistics.median(times), "all_step_ms": times, "memory_at_rest_gib": None,
                "peak_memory_gib": None}
    torch.cuda.synchronize()
    rest = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"step_ms": statistics.median(times), "all_step_ms": times,
            "memory_at_rest_gib": rest / 2**30, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["llama7b", "stories260K"], choices=["llama7b", "stories260K"])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 7B-shaped stack")
    parser.add_argument("--bits", type=float, nargs="+", default=[1.15, 2.0, 4.0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "train_step_gpu.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="fp32 on the CPU (tests the script, times nothing)")
    args = parser.parse_args(argv)
    if not (args.cpu_smoke or torch.cuda.is_available()):
        raise SystemExit("bench_train_step_gpu needs a CUDA GPU (the CPU step is experiments.bench.train_step)")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    from lowra.atomic import write_text_atomic

    report = {"device": "cpu smoke run" if args.cpu_smoke else torch.cuda.get_device_properties(0).name,
              "dtype": str(dtype), "torch": torch.__version__, "batch": args.batch, "seq": args.seq,
              "rank": args.rank, "alpha": args.alpha, "layers_llama7b": args.layers, "results": []}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.model:
        batch = None
        configs = [("bf16 + PEFT LoRA", None)] + [(f"LowRA {b:g}b", b) for b in args.bits]
        base_ms = None
        for label, bits in configs:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model = build_model(name, args.layers, device, dtype)
            if batch is None:
                gen = torch.Generator().manual_seed(0)
                batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
            model, params = peft_lora(model, args.rank, args.alpha) if bits is None else lowra(model, bits, args.rank)
            row = {"model": name, "config": label, "bits": bits, **time_steps(model, params, batch, args.warmup,
                                                                              args.steps)}
            base_ms = base_ms or row["step_ms"]
            row["ratio_to_peft_lora"] = row["step_ms"] / base_ms
            report["results"].append(row)
            memory = "" if row["peak_memory_gib"] is None else (
                f"  rest {row['memory_at_rest_gib']:6.2f} GiB  peak {row['peak_memory_gib']:6.2f} GiB")
            print(f"{name:<12} {label:<18} {row['step_ms']:9.2f} ms  ×{row['ratio_to_peft_lora']:5.2f}{memory}",
                  flush=True)
            write_text_atomic(args.out, json.dumps(report, indent=1))
            del model, params
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
