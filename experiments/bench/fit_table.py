"""What fits where: LowRA fine-tuning memory of Llama 7B/13B/33B/70B, COMPUTED from the format.

``python -m experiments.bench.fit_table`` prints the docs/streaming.md table (markdown) and writes
``results/bench/fit_table.json``. Nothing is measured: every number is computed.

``--quantize`` adds the streamed quantization of the default ``quant=lowra`` (block-wise K-FAC
calibration, pass 1, plan, pass 2 with the calibrated init), COMPUTED from measured per-layer peaks
(``experiments.bench.layer_peaks``: the working memory of one layer's pass 1 / pass 2 beyond its
weight and Gram, fitted to ``a·out·in + b·in² + c`` over the measured shapes) plus the tensors that
coexist with them (below, :func:`quantize_peaks`).

* **quantized base**: every projection of every block (q, k, v, o, gate, up, down) stored by
  ``lowra.format.row_storage_bits`` (codes in int32 words, row index, fp16 per-row codebook, fp16
  absmax per group of 64). A fractional budget is counted as the two neighbouring candidate widths
  mixed to that average (1.15 → 85 % of the rows at 1 bit, 15 % at 2 bits; 1.5 → half and half),
  which is the plan's shape when every row has the same length.
* **embeddings, lm_head, norms** stay in bf16 (``keep_full_precision``; Llama-2 unties ``lm_head``).
* **adapters**: rank ``r`` on all seven projections in bf16, their bf16 gradients and AdamW's two
  fp32 moments (``lowra.model_memory.memory_report``'s accounting).
* **activations** at batch × sequence with gradient checkpointing: each block's bf16 input kept
  (``L·b·s·h·2``), one block recomputed at a time (``b·s·(10h + 3f)·2``: attention projections,
  SDPA output, MLP intermediates and their gradients), and the logits (bf16 + fp32 + fp32 gradient,
  ``b·s·V·10``). An estimate of the live tensors, not of allocator slack.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lowra.format import row_storage_bits

REPO = Path(__file__).resolve().parents[2]
GB = 1e9

#: Llama architectures: hidden, FFN, layers, attention heads, KV heads, vocabulary, tied embeddings.
MODELS: dict[str, dict[str, Any]] = {
    "7B": dict(hidden=4096, ffn=11008, layers=32, heads=32, kv_heads=32, vocab=32000, tied=False),
    "13B": dict(hidden=5120, ffn=13824, layers=40, heads=40, kv_heads=40, vocab=32000, tied=False),
    "33B": dict(hidden=6656, ffn=17920, layers=60, heads=52, kv_heads=52, vocab=32000, tied=False),
    "70B": dict(hidden=8192, ffn=28672, layers=80, heads=64, kv_heads=8, vocab=32000, tied=False),
}
BITS = (1.15, 1.5, 2.0, 4.0)
CANDIDATES = (1, 2, 4)
DEVICES_GB = (24, 48, 80)


def projections(m: dict[str, Any]) -> list[tuple[int, int]]:
    """``(out, in)`` of the seven target linears of one block."""
    h, f = m["hidden"], m["ffn"]
    kv = m["kv_heads"] * (h // m["heads"])
    return [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]


def width_mix(bits: float, candidates: tuple[int, ...] = CANDIDATES) -> dict[int, float]:
    """Fractions of rows per width that average ``bits`` with the two neighbouring candidates."""
    if bits in candidates:
        return {int(bits): 1.0}
    lo = max(c for c in candidates if c < bits)
    hi = min(c for c in candidates if c > bits)
    frac_hi = (bits - lo) / (hi - lo)
    return {lo: 1.0 - frac_hi, hi: frac_hi}


def base_bytes(m: dict[str, Any], bits: float, group_size: int = 64) -> float:
    """Stored bytes of every quantized projection at the average code-bit budget ``bits``."""
    total = 0.0
    for out, inp in projections(m):
        for b, frac in width_mix(bits).items():
            total += frac * out * row_storage_bits(inp, b, group_size) / 8
    return total * m["layers"]


def dense_bytes(m: dict[str, Any]) -> int:
    """bf16 embeddings, lm_head (untied) and norms."""
    h, v = m["hidden"], m["vocab"]
    emb = v * h * (1 if m["tied"] else 2)
    norms = (2 * m["layers"] + 1) * h
    return 2 * (emb + norms)


def adapter_params(m: dict[str, Any], rank: int) -> int:
    return m["layers"] * sum(rank * (o + i) for o, i in projections(m))


def activation_bytes(m: dict[str, Any], batch: int, seq: int) -> int:
    h, f, v, n = m["hidden"], m["ffn"], m["vocab"], m["layers"]
    tokens = batch * seq
    return n * tokens * h * 2 + tokens * (10 * h + 3 * f) * 2 + tokens * v * 10


def table(rank: int = 64, batch: int = 1, seq: int = 2048) -> list[dict[str, Any]]:
    """One row per model × budget: bytes by category, total, and which device sizes it fits."""
    rows = []
    for name, m in MODELS.items():
        n_adapt = adapter_params(m, rank)
        adapters = n_adapt * 2
        grads = n_adapt * 2
        optim = n_adapt * 8
        act = activation_bytes(m, batch, seq)
        for bits in BITS:
            base = base_bytes(m, bits) + dense_bytes(m)
            total = base + adapters + grads + optim + act
            rows.append({
                "model": name, "bits": bits, "base_gb": base / GB, "adapters_gb": adapters / GB,
                "optimizer_gb": (grads + optim) / GB, "activations_gb": act / GB, "total_gb": total / GB,
                "fits": {str(d): total <= d * GB for d in DEVICES_GB},
            })
    return rows


def _fit(rows: list[dict[str, Any]], phase: str) -> tuple[float, float, float]:
    """Least-squares ``(a, b, c)`` of ``peak_above_inputs ≈ a·out·in + b·in² + c`` over the measured layers."""
    import numpy as np

    pts = [r for r in rows if r["phase"] == phase]
    if len(pts) < 3:
        raise ValueError(f"fit_table --quantize needs ≥ 3 measured {phase} shapes (experiments.bench.layer_peaks)")
    x = np.array([[r["out"] * r["in"], r["in"] ** 2, 1.0] for r in pts], dtype=float)
    y = np.array([r["peak_above_inputs_bytes"] for r in pts], dtype=float)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(coef[0]), float(coef[1]), float(max(coef[2], 0.0))


def quantize_peaks(m: dict[str, Any], measured: list[dict[str, Any]], samples: int = 64, seq: int = 256,
                   chunk: int = 4, candidates: tuple[int, ...] = (1, 2, 3, 4)) -> dict[str, float]:
    """Peak host (or device) bytes of each stage of streamed ``quant=lowra`` on model ``m``.

    * calibration (block-wise, K-FAC): one block's weights materialized in fp32, the fp64 input Grams
      of its distinct inputs (attention, o_proj, MLP, down_proj), one chunk's autograd activations
      (``chunk·seq`` tokens, ``(10h + 3f)·4`` bytes per token, the fit_table estimate in fp32) and the
      boundary being written; or the loss step: the LM head in fp32 and one slice's logits;
    * pass 1 / pass 2: the widest layer's fp32 weight + its fp64 Gram + the fitted working memory,
      plus what the pass keeps for every row (pass 1: codebooks of every candidate in fp32 and the
      float64 error table; pass 2: the same codebooks until the layer is written).
    """
    h, f, v = m["hidden"], m["ffn"], m["vocab"]
    proj = projections(m)
    rows = m["layers"] * sum(o for o, _ in proj)
    resident = rows * (sum(4 * 2 ** b for b in candidates) + 8 * len(candidates))
    block_fp32 = 4 * sum(o * i for o, i in proj)
    grams = 8 * (3 * h * h + f * f)
    acts = chunk * seq * (10 * h + 3 * f) * 4
    calib = max(block_fp32 + grams + acts + 2 * chunk * seq * h * 4, 4 * v * h + 3 * 128 * v * 4)
    out = {"calibration": calib}
    for phase in ("pass1", "pass2"):
        a, b, c = _fit(measured, phase)
        out[phase] = max(4 * o * i + 8 * i * i + a * o * i + b * i * i + c for o, i in proj) + resident
    return out


def quantize_table(measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, m in MODELS.items():
        peaks = quantize_peaks(m, measured)
        peak = max(peaks.values())
        rows.append({"model": name, **{f"{k}_gb": val / GB for k, val in peaks.items()}, "peak_gb": peak / GB,
                     "fits_80gb_device": peak <= 80 * GB, "fits_128gb_host": peak <= 128 * GB})
    return rows


def markdown(rows: list[dict[str, Any]], rank: int, batch: int, seq: int) -> str:
    head = (f"| model | bits | quantized base + bf16 embeddings (GB) | adapters r={rank} (GB) | grads + AdamW (GB) | "
            f"activations b={batch}×{seq} (GB) | total (GB) | " + " | ".join(f"{d} GB" for d in DEVICES_GB) + " |")
    lines = [head, "|" + "---|" * (7 + len(DEVICES_GB))]
    for r in rows:
        fits = " | ".join("✓" if r["fits"][str(d)] else "✗" for d in DEVICES_GB)
        lines.append(f"| {r['model']} | {r['bits']:g} | {r['base_gb']:.1f} | {r['adapters_gb']:.2f} | "
                     f"{r['optimizer_gb']:.2f} | {r['activations_gb']:.1f} | {r['total_gb']:.1f} | {fits} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--json", type=Path, default=REPO / "results" / "bench" / "fit_table.json")
    p.add_argument("--quantize", type=Path, nargs="?", const=REPO / "results" / "bench" / "layer_peaks_cpu.json",
                   help="also the streamed quant=lowra peaks, computed from these measured per-layer peaks")
    args = p.parse_args(argv)
    rows = table(args.rank, args.batch, args.seq)
    print(markdown(rows, args.rank, args.batch, args.seq))
    payload: dict[str, Any] = {"computed": True, "rank": args.rank, "batch": args.batch, "seq": args.seq,
                               "rows": rows}
    if args.quantize is not None:
        measured = json.loads(args.quantize.read_text())["rows"]
        qrows = quantize_table(measured)
        print("\nStreamed quant=lowra (default; computed from measured per-layer peaks, "
              f"{args.quantize.name}):\n| model | calibration (GB) | pass 1 (GB) | pass 2 (GB) | peak (GB) | "
              "80 GB device | 128 GB host |\n|---|---|---|---|---|---|---|")
        for r in qrows:
            print(f"| {r['model']} | {r['calibration_gb']:.1f} | {r['pass1_gb']:.1f} | {r['pass2_gb']:.1f} | "
                  f"{r['peak_gb']:.1f} | {'✓' if r['fits_80gb_device'] else '✗'} | "
                  f"{'✓' if r['fits_128gb_host'] else '✗'} |")
        payload["quantize"] = {"computed_from": str(args.quantize.name), "measured": measured, "rows": qrows}
    from lowra.atomic import write_text_atomic

    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps(payload, indent=1))
    return rows


if __name__ == "__main__":
    main()
