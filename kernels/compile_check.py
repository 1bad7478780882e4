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

KERNELS = ("pack", "unpack", "quantize", "dequantize", "lut_gemv", "lut_mm", "gemv_v2", "dequantize_v2")
V2_KERNELS = ("gemv_v2", "dequantize_v2")  # plain triton.jit kernels with one config per bit-width


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
    elif name == "gemv_v2":
        from lowra_kernels.gemv_v2 import _gemv_v2_kernel as k
    elif name == "dequantize_v2":
        from lowra_kernels.dequantize_v2 import _dequantize_v2_kernel as k
    else:
        raise ValueError(f"unknown kernel {name!r}; expected one of {KERNELS}")
    return k


def _jit(name: str) -> Any:
    """The ``triton.jit`` function of kernel ``name`` (under its autotuner, if any)."""
    k = _kernel(name)
    return k.fn if hasattr(k, "configs") else k


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
    if name in V2_KERNELS:
        return _args_v2(name, bits, t, rows, extra)
    raise ValueError(f"unknown kernel {name!r}")


def _args_v2(name: str, bits: int, t: Any, rows: int, extra: dict) -> dict[str, Any]:
    """Representative launch arguments of the v2 kernels (layout v2: ``[tiles, rows, tile words]``)."""
    import torch

    from lowra_kernels.layout_v2 import TILE, tile_words

    e = torch.empty
    i32, i64, f16, f32 = torch.int32, torch.int64, torch.float16, torch.float32
    tiles = -(-IN_FEATURES // TILE)
    common = dict(q_ptr=e(1, dtype=i32), cb_ptr=e(1, dtype=f16), s_ptr=e(1, dtype=f16), rows_ptr=e(1, dtype=i64),
                  n_rows=rows, K=IN_FEATURES, tiles=tiles, stride_qt=rows * tile_words(bits), stride_cbr=1 << bits,
                  stride_sg=rows, BITS=bits, GROUP=GROUP_SIZE, EVEN_K=IN_FEATURES % TILE == 0)
    if name == "gemv_v2":
        from lowra_kernels.gemv_v2 import gemv_v2_launch_shape

        block_m = extra["BLOCK_M"]
        per = gemv_v2_launch_shape(rows, tiles, bits, block_m)[3]
        return dict(common, x_ptr=e(1, dtype=t), ws_ptr=e(1, dtype=f32), M=block_m, row0=0, tiles_per_split=per,
                    stride_xm=IN_FEATURES, stride_ws_s=block_m * OUT_FEATURES, stride_ws_m=OUT_FEATURES,
                    BLOCK_M=block_m, ROW_MASK=False, OPAQUE=True)  # the whole row blocks (the hot launch)
    return dict(common, out_ptr=e(1, dtype=t), stride_or=IN_FEATURES)


def _axes(name: str) -> list[tuple[str, dict]]:
    """(dtype, extra) combinations of a kernel besides bits and config."""
    if name in ("pack", "unpack"):
        return [("-", {})]
    if name == "lut_gemv":
        from lowra_kernels.lut_matmul import GEMV_BLOCK_M

        return [(d, {"BLOCK_M": bm}) for d in ACT_DTYPES for bm in GEMV_BLOCK_M]
    if name == "gemv_v2":
        return [(d, {"BLOCK_M": bm}) for d in ACT_DTYPES for bm in (1, 2, 4)]
    return [(d, {}) for d in ACT_DTYPES]


def _configs(name: str, args: dict) -> list:
    """The shipped autotune configs of a kernel, pruned as its autotuner prunes them for ``args``."""
    if name in V2_KERNELS:
        import triton

        if name == "gemv_v2":

            from lowra_kernels.gemv_v2 import GEMV_V2_CONFIG, GEMV_V2_MAXNREG, gemv_v2_block_m, gemv_v2_block_n

            if gemv_v2_block_m(args["BLOCK_M"], args["BITS"], args["x_ptr"].dtype) < args["BLOCK_M"]:
                return []  # never launched: that M tile runs in smaller tiles

            block_n, warps = gemv_v2_block_n(args["BITS"], args["BLOCK_M"]), GEMV_V2_CONFIG[args["BITS"]][1]
            return [triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=1, maxnreg=GEMV_V2_MAXNREG)]
        from lowra_kernels.dequantize_v2 import DEQUANT_V2_CONFIG

        block_r, tiles, warps = DEQUANT_V2_CONFIG[args["BITS"]]
        return [triton.Config({"BLOCK_R": block_r, "TILES": tiles}, num_warps=warps, num_stages=1)]
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
        "main_loop_mem": memory_ops(body),
        "kernel_mem": memory_ops(real),
    }


_MEM_OPS = ("LDG", "STG", "LDS", "STS", "LDSM", "LDGSTS", "ATOMG", "RED", "LDL", "STL")


def memory_width(op: str) -> int:
    """Bytes per lane of a SASS memory opcode (``LDG.E.128`` 16, ``.64`` 8, ``.U16``/``.S16`` 2,
    ``.U8``/``.S8`` 1, otherwise 4)."""
    parts = op.split(".")[1:]
    for suffix, width in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if suffix in parts:
            return width
    return 4


def memory_ops(seq: list[tuple[int, str, str]]) -> dict[str, Any]:
    """Memory instructions of a SASS sequence: per class (``LDG``, ``STS``, ...) a map
    bytes-per-lane → count, and the barrier count (``BAR``)."""
    out: dict[str, Any] = {"BAR": 0}
    for _, op, _ in seq:
        base = op.split(".")[0]
        if base == "BAR":
            out["BAR"] += 1
        elif base in _MEM_OPS:
            widths = out.setdefault(base, {})
            w = str(memory_width(op))
            widths[w] = widths.get(w, 0) + 1
    return out


def compile_variant(v: dict, sass: bool = False) -> dict:
    """Compile one variant for its arch; return it with resources (or the error)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    out = dict(v)
    t0 = time.perf_counter()
    cpu0 = _cpu_seconds()
    try:
        fn = _jit(v["kernel"])
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


def _plain(value: Any) -> Any:
    """A JSON-able stand-in of a launch argument (tensors by dtype: only their dtype specializes,
    besides the 16-byte alignment every representative tensor has)."""
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"tensor:{value.dtype}"
    return value


def input_hash(v: dict) -> str:
    """A hash of everything a variant's binary depends on: the kernel's source with its ``triton.jit``
    dependencies and referenced globals (Triton's own ``JITFunction.cache_key``), the specialized
    launch arguments, the config, the target and the Triton version (its bundled ptxas). Equal hashes
    mean an identical compile, so a recorded result may stand in for it (``run(..., cache=...)``)."""
    import triton

    fn = _jit(v["kernel"])
    args = {k: _plain(a) for k, a in _args(v["kernel"], v["bits"], v["dtype"], v["extra"]).items()}
    key = {"triton": triton.__version__, "source": fn.cache_key, "args": args,
           **{k: v.get(k) for k in ("arch", "config", "num_warps", "num_stages", "maxnreg")}}
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def load_cache(path: Path | list[Path] | None, sass: bool) -> dict[str, dict]:
    """Recorded results of earlier reports (``input_hash`` → row; a list of reports: the first one that
    has a hash wins), successful compiles only; with ``sass`` only rows that carry SASS statistics."""
    out: dict[str, dict] = {}
    for p in ([] if path is None else [path] if isinstance(path, (str, Path)) else path)[::-1]:
        if Path(p).exists():
            rows = json.loads(Path(p).read_text()).get("results", [])
            out.update({r["input_hash"]: r for r in rows
                        if r.get("ok") and "input_hash" in r and (not sass or "sass" in r)})
    return out


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


def compile_all(todo: list[dict], jobs: int, sass: bool = False, cache: Path | list[Path] | None = None) -> list[dict]:
    """Compile ``todo`` (a process pool of ``jobs``), in order; a variant whose ``input_hash`` has a
    recorded result in ``cache`` (an earlier report) takes that result (``"cached": True``)."""
    hashes = [input_hash(v) for v in todo]
    known = load_cache(cache, sass)
    miss = [i for i, h in enumerate(hashes) if h not in known]
    if jobs > 1 and len(miss) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            done = list(pool.map(_worker, [(todo[i], sass) for i in miss], chunksize=1))
    else:
        done = [compile_variant(todo[i], sass) for i in miss]
    fresh = dict(zip(miss, done))
    results = []
    for i, (v, h) in enumerate(zip(todo, hashes)):
        r = fresh[i] if i in fresh else dict(known[h], **v, cached=True, compile_s=0.0, cpu_s=0.0)
        r["input_hash"] = h
        results.append(r)
    return results


VERIFIED = ("registers", "spill_bytes", "shared_bytes", "sass_sha1")


def verify_cached(results: list[dict], n: int, jobs: int) -> list[dict]:
    """Recompile ``n`` of the cached results (evenly spread) and return those whose registers, spills,
    shared memory or SASS hash differ from the record (a stale or edited cache, or a changed toolchain)."""
    cached = [r for r in results if r.get("cached")]
    sample = cached[::max(1, len(cached) // n)][:n] if n > 0 else []
    todo = [{k: r[k] for k in ("kernel", "arch", "bits", "dtype", "extra", "config_index", "config", "num_warps",
                               "num_stages", "maxnreg")} for r in sample]
    if jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            fresh = list(pool.map(_worker, [(v, False) for v in todo], chunksize=1))
    else:
        fresh = [compile_variant(v) for v in todo]
    for r in sample:
        r["cache_verified"] = True
    return [dict(f, recorded={k: r.get(k) for k in VERIFIED}) for r, f in zip(sample, fresh)
            if not f.get("ok") or any(f.get(k) != r.get(k) for k in VERIFIED)]


def run(archs: tuple[int, ...], jobs: int, sass: bool = False, kernels: tuple[str, ...] = KERNELS,
        smoke_archs: tuple[int, ...] = (), cache: Path | None = None, verify: int = 0) -> dict:
    """Compile every variant (a process pool of ``jobs``; results recorded in ``cache`` with the same
    ``input_hash`` reused); return the summary + per-variant rows."""
    import triton

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError(
            "lowra_kernels.compile_check needs TRITON_INTERPRET unset (the interpreter replaces triton.jit)")
    todo = list(variants(archs, kernels, smoke_archs))
    t0 = time.perf_counter()
    results = compile_all(todo, jobs, sass, cache)
    mismatches = verify_cached(results, verify, jobs)
    wall = time.perf_counter() - t0
    dups = duplicates(results)
    failed = [r for r in results if not r["ok"]]
    spilling = [r for r in results if r.get("ok") and r["spill_bytes"] > 0]
    summary = {
        "triton": triton.__version__, "archs": list(archs), "smoke_archs": list(smoke_archs),
        "kernels": list(kernels), "variants": len(results),
        "compile_failures": len(failed), "spilling_variants": len(spilling),
        "duplicate_binary_groups": len(dups), "wall_s": round(wall, 1), "jobs": jobs,
        "compiled": sum(1 for r in results if not r.get("cached")),
        "from_cache": sum(1 for r in results if r.get("cached")),
        "cache_verified": sum(1 for r in results if r.get("cache_verified")), "cache_mismatches": len(mismatches),
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
    dup_rows = [[results[i]["config_index"] for i in g] + [
        {k: results[g[0]][k] for k in ("kernel", "arch", "bits", "dtype", "extra")}] for g in dups]
    return {"summary": summary, "cache_mismatches": mismatches, "duplicates": dup_rows, "results": results}


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
    parser.add_argument("--cache", type=Path, default=None,
                        help="an earlier report whose results stand in for variants of equal input_hash "
                             "(source, arguments, config, target, Triton version)")
    parser.add_argument("--verify", type=int, default=0,
                        help="recompile this many of the cached variants and fail if any differs from its record")
    args = parser.parse_args(argv)
    report = run(tuple(args.arch), args.jobs, args.sass, tuple(args.kernels), tuple(args.smoke_arch), args.cache,
                 args.verify)
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
    for r in report["cache_mismatches"]:
        print(f"CACHE MISMATCH {r['kernel']} sm_{r['arch']} bits={r['bits']} {r['dtype']} {r['config']}: "
              f"recorded {r['recorded']}, compiled {({k: r.get(k) for k in VERIFIED})}")
    for d in report["duplicates"]:
        print(f"DUPLICATE binaries (config indices {d[:-1]}): {d[-1]}")
    print(f"{s['variants']} variants (triton {s['triton']}, sm_{'/sm_'.join(map(str, s['archs']))}): "
          f"{s['compile_failures']} failed, {s['spilling_variants']} spill, {s['duplicate_binary_groups']} "
          f"duplicate groups; {s['compiled']} compiled, {s['from_cache']} from the cache; {s['wall_s']} s with "
          f"{s['jobs']} jobs; wrote {args.out}")
    return 1 if (s["compile_failures"] or s["spilling_variants"] or s["duplicate_binary_groups"]
                 or s["cache_mismatches"]) else 0


if __name__ == "__main__":
    sys.exit(main())
