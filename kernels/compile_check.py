"""Compile every Triton kernel × shipped autotune config × bit-width × dtype for sm_90 / sm_80, no GPU.

The stock ``triton`` wheel compiles real GPU binaries through its bundled ``ptxas`` when it is
given a target (``GPUTarget("cuda", 90, 32)``); no device is needed. Each variant is specialized
exactly as a launch would specialize it (``native_specialize_impl`` on representative arguments of
an LLM layer, ``out × in = 4096 × 11008``: 16-byte aligned pointers, ints divisible by 16 marked,
ints equal to 1 folded) and compiled with its config's ``num_warps``/``num_stages``. Per variant
the resource usage of the cubin (``cuobjdump --dump-resource-usage``: registers, stack = spill
bytes, shared memory) and a hash of its ``.text`` (the SASS) are recorded; optionally
(``--sass``) the SASS is disassembled (``nvdisasm``) and its instructions counted (total, in the
innermost loop, local-memory spills ``LDL``/``STL``).

``python -m lowra_kernels.compile_check [--arch 90 80] [--smoke-arch 80] [--jobs N] [--sass] --out PATH``
writes JSON
(``make kernels-compile``: ``results/bench/kernels_sm90_static.json``) and exits non-zero on any compile failure,
spilling variant or duplicate binary (two configs of one kernel/bits/dtype with identical SASS).
Compilation is parallel (a process pool) and cached by Triton's own on-disk cache
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``): an unchanged kernel recompiles in
milliseconds. Must run with ``TRITON_INTERPRET`` unset (the interpreter replaces ``triton.jit``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

BITS = (1, 2, 3, 4)
ACT_DTYPES = ("float32", "float16", "bfloat16")
# Representative layer: out × in features (LLaMA-7B MLP down-projection's transpose), group 64.
OUT_FEATURES, IN_FEATURES, GROUP_SIZE = 4096, 11008, 64
GEMM_M = 64  # a fused-GEMM activation row count (16 < M < TRAIN_MIN_M)

KERNELS = ("pack", "unpack", "quantize", "dequantize", "lut_gemv", "lut_mm")


def _tools_dir() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


# ------------------------------------------------------------------------------------ variants
def _kernel(name: str) -> Any:
    """The ``Autotuner`` object of kernel ``name`` (imported with the interpreter off)."""
    if name == "pack":
        from lowra_kernels.pack import _pack_kernel as k
    elif name == "unpack":
        from lowra_kernels.unpack import _unpack_kernel as k
    elif name == "quantize":
        from lowra_kernels.quantize import _quantize_kernel as k
    elif name == "dequantize":
        from lowra_kernels.dequantize import _dequantize_kernel as k
    elif name == "lut_gemv":
        from lowra_kernels.lut_matmul import _lut_gemv_kernel as k
    elif name == "lut_mm":
        from lowra_kernels.lut_matmul import _lut_mm_kernel as k
    else:
        raise ValueError(f"unknown kernel {name!r}; expected one of {KERNELS}")
    return k


def _args(name: str, bits: int, dtype: str, extra: dict) -> dict[str, Any]:
    """Representative launch arguments (CPU tensors stand in for device pointers) of one variant."""
    import torch

    from lowra_kernels.layout import codes_per_word, num_groups, words_per_row

    t = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    per_word = codes_per_word(bits)
    n_words = words_per_row(IN_FEATURES, bits)
    groups = num_groups(IN_FEATURES, GROUP_SIZE)
    rows = OUT_FEATURES // 2  # a bit group holds part of the rows
    e = torch.empty
    i32, i64, f16, f32 = torch.int32, torch.int64, torch.float16, torch.float32
    if name == "pack":
        return dict(codes_ptr=e(1, dtype=i64), words_ptr=e(1, dtype=i32), n_rows=rows, in_features=IN_FEATURES,
                    n_words=n_words, stride_cr=IN_FEATURES, stride_cc=1, stride_wr=n_words, BITS=bits,
                    PER_WORD=per_word)
    if name == "unpack":
        return dict(words_ptr=e(1, dtype=i32), codes_ptr=e(1, dtype=i64), n_rows=rows, in_features=IN_FEATURES,
                    stride_wr=n_words, stride_cr=IN_FEATURES, BITS=bits, PER_WORD=per_word)
    if name == "quantize":
        return dict(w_ptr=e(1, dtype=t), a_ptr=e(1, dtype=f16), t_ptr=e(1, dtype=f32), words_ptr=e(1, dtype=i32),
                    n_rows=rows, in_features=IN_FEATURES, n_words=n_words, group_size=GROUP_SIZE,
                    stride_wr=IN_FEATURES, stride_wc=1, stride_ar=groups, stride_ac=1, stride_tr=(1 << bits) - 1,
                    stride_qr=n_words, BITS=bits, PER_WORD=per_word)
    if name == "dequantize":
        from lowra_kernels.lut import dequant_step

        words, pw2, aligned = dequant_step(bits, GROUP_SIZE)
        return dict(q_ptr=e(1, dtype=i32), rows_ptr=e(1, dtype=i64), cb_ptr=e(1, dtype=f16), a_ptr=e(1, dtype=f16),
                    out_ptr=e(1, dtype=t), n_rows=rows, in_features=IN_FEATURES, stride_qr=n_words,
                    stride_cbr=1 << bits, stride_ar=groups, stride_ac=1, stride_or=IN_FEATURES, stride_oc=1,
                    BITS=bits, PER_WORD=per_word, PW2=pw2, WORDS=words, ALIGNED=aligned, GROUP=GROUP_SIZE)
    if name == "lut_gemv":
        from lowra_kernels.lut import gemv_step

        block_m = extra["BLOCK_M"]
        words, pw2, aligned = gemv_step(bits, GROUP_SIZE)
        return dict(x_ptr=e(1, dtype=t), q_ptr=e(1, dtype=i32), rows_ptr=e(1, dtype=i64), cb_ptr=e(1, dtype=f16),
                    a_ptr=e(1, dtype=f16), ws_ptr=e(1, dtype=f32), M=block_m, n_rows=rows, K=IN_FEATURES,
                    n_split=4, stride_xm=IN_FEATURES, stride_qr=n_words, stride_cbr=1 << bits, stride_ar=groups,
                    stride_ac=1, stride_ws_s=block_m * OUT_FEATURES, stride_ws_m=OUT_FEATURES, BITS=bits,
                    PER_WORD=per_word, PW2=pw2, WORDS=words, ALIGNED=aligned, GROUP=GROUP_SIZE, BLOCK_M=block_m)
    if name == "lut_mm":
        from lowra_kernels.lut_matmul import _dot_precision, m_bucket

        return dict(x_ptr=e(1, dtype=t), q_ptr=e(1, dtype=i32), rows_ptr=e(1, dtype=i64), cb_ptr=e(1, dtype=f16),
                    a_ptr=e(1, dtype=f16), y_ptr=e(1, dtype=t), M=GEMM_M - 1, M_BUCKET=m_bucket(GEMM_M), n_rows=rows,
                    K=IN_FEATURES, group_size=GROUP_SIZE, stride_xm=IN_FEATURES, stride_xk=1, stride_qr=n_words,
                    stride_cbr=1 << bits, stride_ar=groups, stride_ac=1, stride_ym=OUT_FEATURES, stride_yn=1,
                    BITS=bits, PER_WORD=per_word, DOT_PREC=_dot_precision(t))
    raise ValueError(f"unknown kernel {name!r}")


def _axes(name: str) -> list[tuple[str, dict]]:
    """(dtype, extra) combinations of a kernel besides bits and config."""
    if name in ("pack", "unpack"):
        return [("-", {})]
    if name == "lut_gemv":
        from lowra_kernels.lut_matmul import GEMV_BLOCK_M

        return [(d, {"BLOCK_M": bm}) for d in ACT_DTYPES for bm in GEMV_BLOCK_M]
    return [(d, {}) for d in ACT_DTYPES]


def _configs(name: str, args: dict) -> list:
    """The shipped autotune configs of a kernel, pruned as its autotuner prunes them for ``args``."""
    k = _kernel(name)
    space = list(k.configs)
    prune = getattr(k, "early_config_prune", None)
    if prune is not None:
        space = prune(space, args)
    return space


def variants(archs: tuple[int, ...] = (90,), kernels: tuple[str, ...] = KERNELS,
             smoke_archs: tuple[int, ...] = ()) -> Iterator[dict]:
    """Every (kernel, arch, bits, dtype, extra, config) the shipped code can launch; for
    ``smoke_archs`` only the first kept config of each (kernel, bits, dtype, extra)."""
    for name in kernels:
        for dtype, extra in _axes(name):
            for bits in BITS:
                args = _args(name, bits, dtype, extra)
                for ci, cfg in enumerate(_configs(name, args)):
                    for arch in tuple(archs) + (tuple(a for a in smoke_archs if a not in archs) if ci == 0 else ()):
                        yield {"kernel": name, "arch": arch, "bits": bits, "dtype": dtype, "extra": extra,
                               "config_index": ci, "config": dict(cfg.kwargs), "num_warps": cfg.num_warps,
                               "num_stages": cfg.num_stages, "maxnreg": cfg.maxnreg}


# ------------------------------------------------------------------------------------ compile one
def _specialize(fn: Any, args: dict) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attrs exactly as a launch with ``args`` specializes them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, constexprs, attrs = {}, {}, {}
    for idx, p in enumerate(fn.params):
        if p.name not in args:
            raise ValueError(f"{fn.__name__}: no value for argument {p.name!r}")
        v = args[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
            continue
        kind, spec = native_specialize_impl(BaseBackend, v, False, not p.do_not_specialize,
                                            not p.do_not_specialize_on_alignment)
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[p.name] = spec
        elif spec:
            attrs[(idx,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs


def _elf_sections(blob: bytes) -> dict[str, bytes]:
    """Section name → bytes of a 64-bit little-endian ELF (a cubin)."""
    if blob[:4] != b"\x7fELF" or blob[4] != 2:
        raise ValueError("not a 64-bit ELF cubin")
    shoff, = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", blob, 0x3A)
    heads = [struct.unpack_from("<IIQQQQIIQQ", blob, shoff + i * shentsize) for i in range(shnum)]
    strtab = heads[shstrndx]
    names = blob[strtab[4]:strtab[4] + strtab[5]]
    out = {}
    for h in heads:
        name = names[h[0]:names.index(b"\0", h[0])].decode()
        out[name] = blob[h[4]:h[4] + h[5]] if h[1] != 8 else b""  # SHT_NOBITS has no bytes
    return out


def resource_usage(cubin_path: str) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the (single) kernel in a cubin, from ``cuobjdump``."""
    text = subprocess.run([str(_tools_dir() / "cuobjdump"), "--dump-resource-usage", cubin_path],
                          capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump resource usage:\n{text}")
    return dict(zip(("registers", "stack_bytes", "static_shared_bytes", "local_bytes"), map(int, m.groups())))


def sass_stats(cubin_path: str) -> dict[str, Any]:
    """Instruction counts of the SASS: total, innermost-loop body (by backward branch), spills."""
    text = subprocess.run([str(_tools_dir() / "nvdisasm"), "-c", "-hex", cubin_path], capture_output=True,
                          text=True, check=True).stdout
    return analyze_sass(text)


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TARGET = re.compile(r"\.L_x_(\d+)")


def analyze_sass(text: str) -> dict[str, Any]:
    """Counts from ``nvdisasm -c`` text. Loops are backward ``BRA`` to a label; ``loops`` lists
    ``[first, last, instructions]`` of each, innermost (smallest) first."""
    labels: dict[str, int] = {}
    instrs: list[tuple[int, str, str]] = []
    for line in text.splitlines():
        lab = re.match(r"^\.L_x_(\d+):", line.strip())
        if lab:
            labels[lab.group(1)] = len(instrs)
            continue
        m = _INSTR.search(line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(3), m.group(4)))
    loops = []
    for pos, (_, op, rest) in enumerate(instrs):
        if op.startswith("BRA"):
            t = _TARGET.search(rest)
            if t and t.group(1) in labels and labels[t.group(1)] <= pos:
                start = labels[t.group(1)]
                loops.append([start, pos, pos - start + 1])
    loops.sort(key=lambda x: x[2])
    body = instrs[loops[-1][0]:loops[-1][1] + 1] if loops else []

    def mix(seq: list) -> dict[str, int]:
        c: dict[str, int] = defaultdict(int)
        for _, op, _ in seq:
            c[op.split(".")[0]] += 1
        return dict(sorted(c.items(), key=lambda kv: -kv[1]))

    real = [x for x in instrs if x[1] not in ("NOP",)]
    return {
        "instructions": len(real),
        "spill_instructions": sum(1 for _, op, _ in instrs if op.split(".")[0] in ("LDL", "STL")),
        "loops": loops,
        "main_loop_instructions": sum(1 for x in body if x[1] != "NOP"),
        "main_loop_mix": mix([x for x in body if x[1] != "NOP"]),
    }


def compile_variant(v: dict, sass: bool = False) -> dict:
    """Compile one variant for its arch; return it with resources (or the error)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    out = dict(v)
    t0 = time.perf_counter()
    cpu0 = _cpu_seconds()
    try:
        fn = _kernel(v["kernel"]).fn
        args = dict(_args(v["kernel"], v["bits"], v["dtype"], v["extra"]), **v["config"])
        signature, constexprs, attrs = _specialize(fn, args)
        kernel = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", v["arch"], 32),
                                options={"num_warps": v["num_warps"], "num_stages": v["num_stages"],
                                         "maxnreg": v.get("maxnreg")})
        cubin = kernel.asm["cubin"]
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(cubin)
        try:
            out.update(resource_usage(f.name))
            if sass:
                out["sass"] = sass_stats(f.name)
        finally:
            os.unlink(f.name)
        text = b"".join(b for n, b in sorted(_elf_sections(cubin).items()) if n.startswith(".text"))
        out["sass_sha1"] = hashlib.sha1(text).hexdigest()
        out["shared_bytes"] = int(kernel.metadata.shared)
        out["spill_bytes"] = out["stack_bytes"] + out["local_bytes"]
        out["ok"] = True
    except Exception as exc:  # a compile failure is a result, reported and counted
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
    out["compile_s"] = round(time.perf_counter() - t0, 3)
    out["cpu_s"] = round(_cpu_seconds() - cpu0, 3)
    return out


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas, cuobjdump)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _worker(job: tuple[dict, bool]) -> dict:
    return compile_variant(*job)


# ------------------------------------------------------------------------------------ run all
def duplicates(results: list[dict]) -> list[list[int]]:
    """Groups (result indices) of configs of one kernel/arch/bits/dtype/extra with identical SASS."""
    seen: dict[tuple, list[int]] = defaultdict(list)
    for idx, r in enumerate(results):
        if r.get("ok"):
            key = (r["kernel"], r["arch"], r["bits"], r["dtype"], json.dumps(r["extra"], sort_keys=True),
                   r["sass_sha1"])
            seen[key].append(idx)
    return [ids for ids in seen.values() if len(ids) > 1]


def run(archs: tuple[int, ...], jobs: int, sass: bool = False, kernels: tuple[str, ...] = KERNELS,
        smoke_archs: tuple[int, ...] = ()) -> dict:
    """Compile every variant (a process pool of ``jobs``); return the summary + per-variant rows."""
    import triton

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError(
            "lowra_kernels.compile_check needs TRITON_INTERPRET unset (the interpreter replaces triton.jit)")
    todo = list(variants(archs, kernels, smoke_archs))
    t0 = time.perf_counter()
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(_worker, [(v, sass) for v in todo], chunksize=1))
    else:
        results = [compile_variant(v, sass) for v in todo]
    wall = time.perf_counter() - t0
    dups = duplicates(results)
    failed = [r for r in results if not r["ok"]]
    spilling = [r for r in results if r.get("ok") and r["spill_bytes"] > 0]
    summary = {
        "triton": triton.__version__, "archs": list(archs), "smoke_archs": list(smoke_archs),
        "kernels": list(kernels), "variants": len(results),
        "compile_failures": len(failed), "spilling_variants": len(spilling),
        "duplicate_binary_groups": len(dups), "wall_s": round(wall, 1), "jobs": jobs,
        "cpu_s": round(sum(r["cpu_s"] for r in results), 1),
        "representative_layer": {"out": OUT_FEATURES, "in": IN_FEATURES, "group_size": GROUP_SIZE,
                                 "gemm_m": GEMM_M},
        "per_kernel": {},
    }
    for name in kernels:
        rs = [r for r in results if r["kernel"] == name and r.get("ok")]
        if rs:
            summary["per_kernel"][name] = {
                "variants": sum(1 for r in results if r["kernel"] == name),
                "max_registers": max(r["registers"] for r in rs),
                "max_spill_bytes": max(r["spill_bytes"] for r in rs),
                "max_shared_bytes": max(r["shared_bytes"] for r in rs),
            }
    return {"summary": summary, "duplicates": [[results[i]["config_index"] for i in g] + [
        {k: results[g[0]][k] for k in ("kernel", "arch", "bits", "dtype", "extra")}] for g in dups],
            "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="*", type=int, default=[90, 80], help="SM versions (default 90 80)")
    parser.add_argument("--smoke-arch", nargs="*", type=int, default=[],
                        help="SM versions compiled for the first config of each variant group only")
    parser.add_argument("--kernels", nargs="*", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--sass", action="store_true", help="also disassemble and count SASS instructions")
    parser.add_argument("--out", type=Path, required=True,
                        help="where to write the JSON report (make kernels-compile: results/bench/...)")
    args = parser.parse_args(argv)
    report = run(tuple(args.arch), args.jobs, args.sass, tuple(args.kernels), tuple(args.smoke_arch))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, args.out)  # atomic: a reader never sees half a report
    s = report["summary"]
    print(f"{'kernel':>11} {'variants':>8} {'max regs':>8} {'max spill B':>11} {'max smem B':>10}")
    for name, k in s["per_kernel"].items():
        print(f"{name:>11} {k['variants']:>8} {k['max_registers']:>8} {k['max_spill_bytes']:>11} "
              f"{k['max_shared_bytes']:>10}")
    for r in report["results"]:
        if not r["ok"]:
            print(f"FAILED {r['kernel']} sm_{r['arch']} bits={r['bits']} {r['dtype']} {r['config']}: {r['error']}")
        elif r["spill_bytes"]:
            print(f"SPILLS {r['spill_bytes']} B: {r['kernel']} sm_{r['arch']} bits={r['bits']} {r['dtype']} "
                  f"{r['extra']} {r['config']} warps={r['num_warps']} stages={r['num_stages']}")
    for d in report["duplicates"]:
        print(f"DUPLICATE binaries (config indices {d[:-1]}): {d[-1]}")
    print(f"{s['variants']} variants (triton {s['triton']}, sm_{'/sm_'.join(map(str, s['archs']))}): "
          f"{s['compile_failures']} failed, {s['spilling_variants']} spill, {s['duplicate_binary_groups']} "
          f"duplicate groups; {s['wall_s']} s with {s['jobs']} jobs; wrote {args.out}")
    return 1 if (s["compile_failures"] or s["spilling_variants"] or s["duplicate_binary_groups"]) else 0


if __name__ == "__main__":
    sys.exit(main())
