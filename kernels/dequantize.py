"""Dequantize the rows of one bit-width into their original rows of the output matrix.

``out[rows[i], j] = codebook[i, code[i, j]] * absmax[rows[i], j // group_size]``. Rows are stored
grouped by bit-width, so a full matrix is the union of one call per stored width.
``dequantize_ref`` is the pure-PyTorch reference (the CPU path and the test oracle);
``dequantize`` dispatches to the Triton kernel ``_dequantize_kernel`` on CUDA or when forced: words
loaded once and unpacked by constant shifts; at 1–2 bits a register select tree over group-scaled
codebook entries, at 3–4 bits one shared-memory load per code from a per-step table of the codebook
times the scale of each group the step touches (3-bit words as 8 + 2 codes, no padding lanes);
scatter to the original rows, one pass. Both compute the product in fp32 and round once to the
output dtype, so the kernel is bit-exact with the reference.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import triton
import triton.language as tl

from lowra_kernels.autotune import autotune, configs
from lowra_kernels.config_table import config_meta, device_name, lookup
from lowra_kernels.layout import codes_per_word
from lowra_kernels.lut import dequant_step, gather_groups, lut_select
from lowra_kernels.unpack import unpack_ref
from lowra_kernels.weight import PackedWeight


def dequantize_ref(
    codes: torch.Tensor,
    rows: torch.Tensor,
    codebook: torch.Tensor,
    absmax: torch.Tensor,
    bits: int,
    group_size: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write the dequantized rows of one bit-width into ``out`` and return it.

    Args:
        codes: int32 ``[n, words]`` packed codes of the ``n`` rows stored at ``bits`` bits.
        rows: ``[n]`` original row index of each stored row.
        codebook: ``[n, 2**bits]`` per-row mapping values, or ``[1, 2**bits]`` shared by all rows.
        absmax: ``[out_features, groups]`` group absmax of every row, in original row order.
        out: ``[out_features, in_features]`` output (any float dtype); rows not in ``rows`` are
            left untouched.
    """
    if codes.shape[0] == 0:
        return out
    in_features = out.shape[1]
    idx = unpack_ref(codes, bits, in_features)
    table = codebook.to(torch.float32)
    if table.shape[0] == 1:
        values = table[0][idx]
    else:
        values = torch.gather(table, 1, idx)
    rows = rows.to(torch.long)
    scale = absmax[rows].to(torch.float32).repeat_interleave(group_size, dim=1)[:, :in_features]
    out[rows] = (values * scale).to(out.dtype)
    return out


DEQUANT_TILE_BUDGET = 4096  # max BLOCK_R * (codes per K step, padded) of a select-tree step: larger spill
SELECT_MAX_STEPS = 4  # select-tree programs (1/2 bits): H200, 4096×11008, 2 bits: 4 steps 35.8 µs vs 2 steps 39.3
# codes per program (BLOCK_R * STEPS * WORDS * PER_WORD) of a gathered 3/4-bit program: above the
# ceiling the 3-bit tile spills. The floor admits BLOCK_R=16, STEPS=1, the fastest on an H200
# (4096×11008: 3 bits 107.6 µs vs 165 for the best config above the old floor of 4096; 4 bits 75 vs 93;
# experiments.bench.gpu_profile, results/bench/gpu_profile_h200.json)
DEQUANT_GATHER_CODES = (1024, 20480)


def prune_dequantize_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Keep the dequantize configs meant for this step kind (never empty).

    Select-tree steps (1/2 bits, tiny groups): ``STEPS ≤ SELECT_MAX_STEPS`` and a
    ``[BLOCK_R, WORDS, PW2]`` step within ``DEQUANT_TILE_BUDGET``. Gathered 3/4-bit steps
    (``lut.gather_groups``): ``BLOCK_R * STEPS * WORDS * PER_WORD`` codes per program within
    ``DEQUANT_GATHER_CODES`` (more codes per program spread the per-step table and barrier).
    """
    def arg(name: str, default: int) -> int:
        return kwargs.get(name, named_args.get(name, default))

    bits, words, pw2 = arg("BITS", 2), arg("WORDS", 4), arg("PW2", 16)
    if gather_groups(bits, words, arg("ALIGNED", True), arg("GROUP", 64)):
        codes = words * codes_per_word(bits)
        lo, hi = DEQUANT_GATHER_CODES
        keep = [c for c in configs if lo <= c.kwargs["BLOCK_R"] * c.kwargs["STEPS"] * codes <= hi]
    else:
        keep = [c for c in configs
                if c.kwargs["STEPS"] <= SELECT_MAX_STEPS and c.kwargs["BLOCK_R"] * words * pw2 <= DEQUANT_TILE_BUDGET]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_R"] * c.kwargs["STEPS"])]


@triton.jit
def _gather_store(word3, w, g0, tab, row_base, o_row, row_ok3, in_features, stride_oc,
                  S0: tl.constexpr, SW: tl.constexpr, BITS: tl.constexpr, PER_WORD: tl.constexpr,
                  GROUP: tl.constexpr, NG: tl.constexpr, BLOCK_R: tl.constexpr, WORDS: tl.constexpr):
    """Store ``table[row, code(k)]`` for the codes ``S0 ≤ s < S0 + SW`` of each word (``SW`` a power of
    two) of a ``[BLOCK_R, WORDS]`` word tile: 3-bit words (10 codes) run as 8 + 2, so no lane is padding."""
    s = S0 + tl.arange(0, SW)[None, None, :]
    k = w[None, :, None] * PER_WORD + s  # [1, WORDS, SW]
    code = (word3 >> (s * BITS)) & ((1 << BITS) - 1)
    if NG > 1:  # entries h·2^BITS.. of the row's table hold the step's group g0 + h
        code += (k // GROUP - g0) * (1 << BITS)
    idx = tl.reshape(tl.broadcast_to(code + row_base, [BLOCK_R, WORDS, SW]), [BLOCK_R * WORDS * SW])
    v = tl.reshape(tl.gather(tab, idx, 0), [BLOCK_R, WORDS, SW])
    tl.store(o_row + k * stride_oc, v, mask=row_ok3 & (k < in_features))


# The shipped space; the first is the interpreter's. Pruned per step kind (``prune_dequantize_configs``):
# 1/2 bits keep the first three, gathered 3/4 bits the last three.
DEQUANT_CONFIGS = configs(
    [{"BLOCK_R": 16, "STEPS": 1}, {"BLOCK_R": 32, "STEPS": 2}, {"BLOCK_R": 64, "STEPS": 1},
     {"BLOCK_R": 32, "STEPS": 4}],
    num_warps=(4,),
)


@autotune(
    DEQUANT_CONFIGS,
    key=["in_features", "BITS", "GROUP"],  # not n_rows: it differs per bit group
    prune_configs_by={"early_config_prune": prune_dequantize_configs},
)
@triton.jit
def _dequantize_kernel(
    q_ptr, rows_ptr, cb_ptr, a_ptr, out_ptr, n_rows, in_features,
    stride_qr, stride_cbr, stride_ar, stride_ac, stride_or, stride_oc,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, PW2: tl.constexpr, WORDS: tl.constexpr,
    ALIGNED: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, STEPS: tl.constexpr,
):
    """out[rows[i], j] = codebook[i, code[i, j]] * absmax[rows[i], j // GROUP] (rounded once).

    ``STEPS`` K steps of ``[BLOCK_R, WORDS]`` packed words per program, each word loaded once and
    unpacked by constant shifts. 1/2 bits (and 3/4 bits with groups too small for a table): the
    lookup is the select tree of ``lowra_kernels.lut`` over codebook entries pre-multiplied by the
    row's group scale (aligned widths) or scaled per code. 3/4 bits (``GATHER``): per step, a table
    ``[BLOCK_R, NG · 2^BITS]`` of the row's codebook times the scale of each of the ≤ 4 groups the
    step touches, rounded to the output dtype once — then each code is one shared-memory load of
    its output value (``tl.gather``); 3-bit words run as 8 + 2 codes (no padding lanes).
    Bit-exact with the reference: every value is the fp32 product rounded once.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    out_ty = out_ptr.dtype.element_ty
    i = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    i_ok = i < n_rows
    orig = tl.load(rows_ptr + i, mask=i_ok, other=0).to(tl.int64)
    i64 = i.to(tl.int64)
    q_row = q_ptr + i64[:, None] * stride_qr  # [BLOCK_R, 1]
    row_ok3 = i_ok[:, None, None]
    o_row = out_ptr + orig[:, None, None] * stride_or
    n_words = tl.cdiv(in_features, PER_WORD)
    SPAN: tl.constexpr = 1 if ALIGNED else (WORDS * PER_WORD - 1) // GROUP + 2  # ≥ groups one step touches
    NG: tl.constexpr = 1 if SPAN == 1 else (2 if SPAN <= 2 else 4)  # table groups (a power of two)
    GATHER: tl.constexpr = BITS >= 3 and SPAN <= 4
    N_CODES: tl.constexpr = 1 << BITS
    if GATHER:
        TABLE: tl.constexpr = N_CODES * NG  # entries per row: the codebook scaled by each group of the step
        e2 = tl.arange(0, TABLE)[None, :]  # [1, TABLE]: entry e of group e // N_CODES of the step
        cb2 = tl.load(cb_ptr + i64[:, None] * stride_cbr + (e2 % N_CODES), mask=i_ok[:, None],
                      other=0.0).to(tl.float32)  # [BLOCK_R, TABLE], loaded once
        a2 = a_ptr + orig[:, None] * stride_ar
        row_base = (tl.arange(0, BLOCK_R) * TABLE)[:, None, None]  # row's slice of the flat table
        SW1: tl.constexpr = PW2 if PW2 <= PER_WORD else PW2 // 2  # 3-bit: codes 0..7, then 8..9
        SW2: tl.constexpr = PER_WORD - SW1
        for step in tl.static_range(STEPS):
            w0 = (pid_c * STEPS + step) * WORDS
            w = w0 + tl.arange(0, WORDS)
            word = tl.load(q_row + w[None, :], mask=i_ok[:, None] & (w < n_words)[None, :], other=0)
            word3 = word[:, :, None]
            g0 = (w0 * PER_WORD) // GROUP
            g2 = g0 + e2 // N_CODES
            sc = tl.load(a2 + g2 * stride_ac, mask=i_ok[:, None] & (g2 * GROUP < in_features), other=0.0)
            tab = tl.reshape((cb2 * sc.to(tl.float32)).to(out_ty), [BLOCK_R * TABLE])
            _gather_store(word3, w, g0, tab, row_base, o_row, row_ok3, in_features, stride_oc, 0, SW1, BITS,
                          PER_WORD, GROUP, NG, BLOCK_R, WORDS)
            if SW2 > 0:
                _gather_store(word3, w, g0, tab, row_base, o_row, row_ok3, in_features, stride_oc, SW1, SW2, BITS,
                              PER_WORD, GROUP, NG, BLOCK_R, WORDS)
    else:
        cb_row = cb_ptr + i64[:, None, None] * stride_cbr  # [BLOCK_R, 1, 1]
        a_row = a_ptr + orig[:, None, None] * stride_ar
        s3 = tl.arange(0, PW2)[None, None, :]
        shift = s3 * BITS
        for step in tl.static_range(STEPS):
            w0 = (pid_c * STEPS + step) * WORDS
            w = w0 + tl.arange(0, WORDS)
            word = tl.load(q_row + w[None, :], mask=i_ok[:, None] & (w < n_words)[None, :], other=0)
            word3 = word[:, :, None]
            k = w[None, :, None] * PER_WORD + s3  # [1, WORDS, PW2]
            k_ok = k < in_features
            if not ALIGNED:
                k_ok = k_ok & (s3 < PER_WORD)
            if ALIGNED:
                scale = tl.load(a_row + ((w0 * PER_WORD) // GROUP) * stride_ac, mask=row_ok3, other=0.0)
                v = lut_select(word3, shift, cb_row, scale.to(tl.float32), row_ok3, 0, N_CODES, BITS - 1, True,
                               out_ty)
            else:
                v = lut_select(word3, shift, cb_row, 1.0, row_ok3, 0, N_CODES, BITS - 1, False, out_ty)
                scale = tl.load(a_row + (k // GROUP) * stride_ac, mask=row_ok3 & k_ok, other=0.0)
                v = v * scale.to(tl.float32)
            tl.store(o_row + k * stride_oc, v.to(out_ty), mask=row_ok3 & k_ok)


@functools.cache
def dequant_config(device: str, bits: int, group: int, in_features: int) -> dict:
    """Launch keywords of the dequantize kernel: the shipped table's config for this GPU model
    (``lowra_kernels.config_table``), else the first config the pruning keeps (warned once per key: no
    tuning at call time); the interpreter (``device`` ``""``) takes ``DEQUANT_CONFIGS[0]``."""
    if not device:
        return config_meta(DEQUANT_CONFIGS[0])
    tuned = lookup(device, "dequantize", bits, group, in_features)
    if tuned is not None:
        return tuned
    words, pw2, aligned = dequant_step(bits, group)
    kept = prune_dequantize_configs(list(DEQUANT_CONFIGS), {}, BITS=bits, WORDS=words, PW2=pw2, ALIGNED=aligned,
                                    GROUP=group)
    warnings.warn(f"no tuned dequantize config for {device} ({bits} bits, group {group}, in {in_features}): using "
                  f"{kept[0].kwargs}; `python -m lowra_kernels.tune` writes one", RuntimeWarning, stacklevel=2)
    return config_meta(kept[0])


def dequantize_triton(
    codes: torch.Tensor,
    rows: torch.Tensor,
    codebook: torch.Tensor,
    absmax: torch.Tensor,
    bits: int,
    group_size: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Triton launcher of ``dequantize_ref`` (same arguments, bit-exact result), with the config from
    ``dequant_config`` (never autotuned per call)."""
    meta = dequant_config(device_name(codes), bits, group_size, out.shape[1])
    return _launch(_dequantize_kernel.fn, codes, rows, codebook, absmax, bits, group_size, out, **meta)


def _launch(
    kernel: Any, codes: torch.Tensor, rows: torch.Tensor, codebook: torch.Tensor, absmax: torch.Tensor,
    bits: int, group_size: int, out: torch.Tensor, **meta: Any,
) -> torch.Tensor:
    """Validate and launch ``kernel``: the autotuned ``_dequantize_kernel``, or (tests) its body
    ``_dequantize_kernel.fn`` with explicit ``meta`` (``BLOCK_R``, ``STEPS``) to run any shipped config."""
    n = codes.shape[0]
    if n == 0:
        return out
    in_features = out.shape[1]
    if codes.shape[1] * codes_per_word(bits) < in_features:
        raise ValueError(f"{codes.shape[1]} words per row cannot hold {in_features} {bits}-bit codes")
    if codebook.shape[-1] != 1 << bits or codebook.shape[0] not in (1, n):
        raise ValueError(f"codebook must be [{n} or 1, {1 << bits}], got {tuple(codebook.shape)}")
    if codes.stride(1) != 1:
        codes = codes.contiguous()
    if codebook.stride(1) != 1:
        codebook = codebook.contiguous()
    stride_cbr = 0 if codebook.shape[0] == 1 else codebook.stride(0)

    words, pw2, aligned = dequant_step(bits, group_size)
    n_words = codes.shape[1]

    def grid(m):
        return (triton.cdiv(n, m["BLOCK_R"]), triton.cdiv(n_words, words * m["STEPS"]))

    kernel[grid](
        codes, rows, codebook, absmax, out, n, in_features,
        codes.stride(0), stride_cbr, absmax.stride(0), absmax.stride(1), out.stride(0), out.stride(1),
        BITS=bits, PER_WORD=codes_per_word(bits), PW2=pw2, WORDS=words, ALIGNED=aligned, GROUP=group_size, **meta,
    )
    return out


def dequantize(
    codes: torch.Tensor,
    rows: torch.Tensor,
    codebook: torch.Tensor,
    absmax: torch.Tensor,
    bits: int,
    group_size: int,
    out: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Dispatching launcher: Triton on CUDA (or when forced), the C++ CPU backend on CPU
    (``lowra_kernels.cpu_backend``, bit-exact), the reference otherwise."""
    from lowra_kernels.dispatch import use_cpu, use_triton

    if use_triton(backend, codes):
        return dequantize_triton(codes, rows, codebook, absmax, bits, group_size, out)
    if use_cpu(backend, codes):
        from lowra_kernels.cpu_backend import dequantize_cpu

        return dequantize_cpu(codes, rows, codebook, absmax, bits, group_size, out)
    return dequantize_ref(codes, rows, codebook, absmax, bits, group_size, out)


def dequantize_weight(w: PackedWeight, dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """The whole weight ``deq(W) [out, in]`` in ``dtype``, rows in their original order.

    ``backend`` as in ``lowra_kernels.dispatch.resolve``; the CPU extension writes every row in one
    pass over its cached tables, Triton and the reference run one call per stored width (the
    reference on a NaN-filled output, so a row no group covers shows up).
    """
    from lowra_kernels.dispatch import resolve

    kind = resolve(backend, w.absmax)
    if kind == "cpu":
        from lowra_kernels.cpu_backend import dequantize_weight_cpu

        return dequantize_weight_cpu(w, dtype)
    if kind == "triton":
        out = torch.empty(w.shape, dtype=dtype, device=w.device)
    else:
        out = torch.full(w.shape, float("nan"), dtype=dtype, device=w.device)
    for bits, codes, rows, codebook in w.groups():
        dequantize(codes, rows, codebook, w.absmax, bits, w.group_size, out, kind)
    return out
