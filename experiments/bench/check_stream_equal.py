"""Check: the streamed ``quantize_pretrained`` equals the in-memory ``quantize_model`` on a real model.

``python -m experiments.bench.check_stream_equal --model ~/.cache/lowra/models/SmolLM2-135M-Instruct --bits 2``
quantizes the model both ways with ``LowRAConfig(bits=...)`` (the default: block-wise calibration,
K-FAC plan, calibrated init) on the same calibration windows of TinyStories text, saves both, and
compares every stored tensor (codes, codebooks, scales, plan, adapters, dense tensors) bit for bit.
Prints per-path time, the per-stage times of the streamed run, and the number of differing tensors;
writes the record to ``--json`` (default ``results/bench/stream_equal_<model>.json``). Exit status 1
when a tensor differs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEXT = REPO.parent / "shared" / "assets" / "corpora" / "tinystories_valid.txt"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--bits", type=float, default=2.0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--codebook-iters", type=int, default=20)
    p.add_argument("--text", type=Path, default=TEXT)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lowra_stream_equal")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lowra
    from lowra.calibration import calibration_windows

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = torch.tensor(tok(args.text.read_text(encoding="utf-8")[:400_000])["input_ids"])
    windows = calibration_windows(ids, args.samples, args.seq_len, seed=0)
    config = lowra.LowRAConfig(bits=args.bits, rank=args.rank, alpha=2.0 * args.rank,
                               codebook_iters=args.codebook_iters)
    shutil.rmtree(args.work, ignore_errors=True)
    t0 = time.perf_counter()
    res = lowra.quantize_pretrained(args.model, args.work / "stream", config, calibration=windows,
                                    dtype=torch.float32, progress=False)
    stream_s = time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    t0 = time.perf_counter()
    report = lowra.quantize_model(model, config, calibration=windows, progress=False)
    memory_s = time.perf_counter() - t0
    lowra.save_quantized(model, args.work / "memory", report=report)
    a = {k: v for f in sorted((args.work / "stream").glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted((args.work / "memory").glob("*.safetensors")) for k, v in load_file(f).items()}
    differ = sorted(k for k in a.keys() & b.keys() if not torch.equal(a[k], b[k]))
    record = {"model": str(args.model), "config": config.to_dict(), "calibration": [args.samples, args.seq_len],
              "stream_s": stream_s, "memory_s": memory_s, "stream_stages": res.stages,
              "times": res.report.times, "tensors": len(a), "only_in_one": sorted(a.keys() ^ b.keys()),
              "differing": differ}
    out = args.json or REPO / "results" / "bench" / f"stream_equal_{args.model.name}.json"
    from lowra.atomic import write_text_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(record, indent=1))
    print(f"stream {stream_s:.1f} s, in memory {memory_s:.1f} s; {len(a)} tensors, "
          f"{len(differ)} differ, {len(record['only_in_one'])} in one only; wrote {out}")
    for stage, st in res.stages.items():
        print(f"  {stage:16} {st['time_s']:8.1f} s  peak RSS {st['peak_rss_bytes'] / 2**20:8.0f} MB")
    return 1 if differ or record["only_in_one"] else 0


if __name__ == "__main__":
    sys.exit(main())
