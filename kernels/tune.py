"""The tuning command: measure the Triton kernels' configs on this GPU and write its config table.

    python -m lowra_kernels.tune --shapes 4096x11008 11008x4096 --bits 1 2 3 4 [--block-m 1 4 16]
    python -m lowra_kernels.tune --from-profile results/bench/h200   # no GPU: table from a profile run

On a GPU, for every shape (``OUTxIN``), width and GEMV M bucket, each candidate config (the shipped
space ``GEMV_CONFIGS`` / ``DEQUANT_CONFIGS`` as the autotuner would prune it; ``--wide``: the
``BLOCK_N × SPLIT_K × num_warps`` grid of ``experiments.bench.gpu_profile --sweep``) runs on a random weight
in the real format (speed does not depend on the values) and the fastest (``triton.testing.do_bench``,
median µs) is written to ``kernels/configs/<gpu>.json`` (``lowra_kernels.config_table``), merged over
the entries already there. ``--from-profile DIR`` builds the table from a saved profile instead
(``gpu_sweep.json``: GEMV at M = 1; ``gpu_profile_before.json``: dequantize configs), which is how the
shipped H200 table was made. This is the only place configs are measured: launches read the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
from pathlib import Path

import torch

from lowra_kernels.config_table import device_slug, table_path

GROUP = 64


def _key(entry: dict) -> tuple:
    return entry["in_features"], entry.get("out_features"), entry["bits"], entry["group"], entry.get("block_m")


def merge(table: dict, kernel: str, entries: list[dict]) -> dict:
    """``table`` with ``entries`` replacing those of the same key (sorted, deterministic)."""
    kept = {_key(e): e for e in table.get(kernel, [])}
    kept.update({_key(e): e for e in entries})
    table[kernel] = [kept[k] for k in sorted(kept, key=lambda k: tuple(-1 if v is None else v for v in k))]
    return table


def from_profile(directory: Path) -> dict:
    """A table from ``experiments.bench.gpu_profile`` outputs in ``directory`` (best graph-replay µs per key)."""
    sweep = json.loads((directory / "gpu_sweep.json").read_text())
    out_features, in_features = sweep["shape"]
    best: dict[tuple, dict] = {}
    for r in sweep["gemv_sweep"]:
        if r["graph_us"] is None:
            continue
        key = (r["bits"], r["m"])
        if key not in best or r["graph_us"] < best[key]["us"]:
            best[key] = {"in_features": in_features, "out_features": out_features, "bits": r["bits"], "group": GROUP,
                         "block_m": r["m"], "us": r["graph_us"],
                         "config": {"BLOCK_N": r["BLOCK_N"], "SPLIT_K": r["SPLIT_K"], "num_warps": r["num_warps"],
                                    "num_stages": 2}}
    table = merge({"device": sweep["device"], "source": f"{directory}"}, "gemv", list(best.values()))
    profile = json.loads((directory / "gpu_profile_before.json").read_text())
    deq = []
    for row in profile["rows"]:
        timed = [c for c in row.get("configs", []) if c["graph_us"]]
        if timed:
            c = min(timed, key=lambda c: c["graph_us"])
            deq.append({"in_features": profile["shape"][1], "bits": row["bits"], "group": GROUP, "us": c["graph_us"],
                        "config": c["config"]})
    return merge(table, "dequantize", deq)


def random_weight(out_features: int, in_features: int, bits: int, device: torch.device):
    """A one-width ``PackedWeight`` with random codes, codebooks and scales (the real format)."""
    from lowra_kernels.layout import num_groups, words_per_row
    from lowra_kernels.weight import PackedWeight

    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**30, (out_features, words_per_row(in_features, bits)), generator=gen,
                          dtype=torch.int32)
    codebook = torch.randn(out_features, 2**bits, generator=gen).sort(dim=1).values.half()
    absmax = (torch.rand(out_features, num_groups(in_features, GROUP), generator=gen) + 0.5).half()
    rows = torch.arange(out_features, dtype=torch.int32)
    return PackedWeight((codes.to(device),), (rows.to(device),), (codebook.to(device),), absmax.to(device), (bits,),
                        GROUP, in_features)


def tune_gemv(w, block_m: int, wide: bool) -> dict:
    """Fastest GEMV config for one width and M bucket (median µs of ``do_bench``)."""
    import triton

    from lowra_kernels import lut_matmul as lm
    from lowra_kernels.config_table import config_meta
    from lowra_kernels.lut import gemv_step

    bits = w.bits[0]
    words, pw2, aligned = gemv_step(bits, GROUP)
    if wide:
        space = [{"BLOCK_N": n, "SPLIT_K": s, "num_warps": nw, "num_stages": 2}
                 for n, s, nw in itertools.product((8, 16, 32, 64, 128), (1, 2, 4, 8), (4, 8))]
    else:
        space = [config_meta(c) for c in lm.prune_gemv_configs(list(lm.GEMV_CONFIGS), {}, BITS=bits, BLOCK_M=block_m,
                                                               WORDS=words, PW2=pw2, ALIGNED=aligned, GROUP=GROUP)]
    x = torch.randn(block_m, w.in_features, device=w.device, dtype=torch.bfloat16)
    (codes,), (rows,), (cb,) = w.codes, w.rows, w.codebooks
    results = []
    for cfg in space:
        ws = torch.empty(cfg["SPLIT_K"], block_m, w.out_features, dtype=torch.float32, device=w.device)
        grid = (triton.cdiv(w.out_features, cfg["BLOCK_N"]), cfg["SPLIT_K"])

        def launch(cfg=cfg, ws=ws, grid=grid):
            lm._lut_gemv_kernel.fn[grid](
                x, codes, rows, cb, w.absmax, ws, block_m, w.out_features, w.in_features, cfg["SPLIT_K"],
                x.stride(0), codes.stride(0), cb.stride(0), w.absmax.stride(0), w.absmax.stride(1), ws.stride(0),
                ws.stride(1), BITS=bits, PER_WORD=lm.codes_per_word(bits), PW2=pw2, WORDS=words, ALIGNED=aligned,
                GROUP=GROUP, BLOCK_M=block_m, **cfg)
        try:
            results.append((triton.testing.do_bench(launch, return_mode="median") * 1e3, cfg))
        except Exception as exc:  # a config that does not compile (resources) is skipped, and said
            print(f"  skipped {cfg}: {type(exc).__name__}")
    us, cfg = min(results, key=lambda r: r[0])
    return {"in_features": w.in_features, "out_features": w.out_features, "bits": bits, "group": GROUP,
            "block_m": block_m, "us": us, "config": cfg}


def write_table(table: dict, path: Path) -> None:
    """Atomic write (temporary file in the same folder, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-profile", type=Path, help="build the table from a saved gpu_profile folder")
    parser.add_argument("--shapes", nargs="+", default=["4096x11008", "11008x4096", "4096x4096"])
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--block-m", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--wide", action="store_true", help="the wide GEMV grid instead of the shipped space")
    parser.add_argument("--out", type=Path, help="table file (default kernels/configs/<gpu>.json)")
    args = parser.parse_args(argv)
    if args.from_profile:
        table = from_profile(args.from_profile)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("tuning measures on a CUDA GPU (or use --from-profile)")
        name = torch.cuda.get_device_name(0)
        path = args.out or table_path(name)
        table = json.loads(path.read_text()) if path.is_file() else {"device": name, "source": "lowra_kernels.tune"}
        entries = []
        for shape, bits in itertools.product(args.shapes, args.bits):
            out_features, in_features = (int(v) for v in shape.split("x"))
            w = random_weight(out_features, in_features, bits, torch.device("cuda"))
            for block_m in args.block_m:
                entries.append(tune_gemv(w, block_m, args.wide))
                print(entries[-1], flush=True)
        table = merge(table, "gemv", entries)
    out = args.out or table_path(table["device"])
    write_table(table, out)
    print(f"wrote {out} ({device_slug(table['device'])}: {len(table.get('gemv', []))} GEMV, "
          f"{len(table.get('dequantize', []))} dequantize entries)")
    return table


if __name__ == "__main__":
    main()
