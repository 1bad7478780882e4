"""LUT matmul with a quantized weight: ``y = x · deq(W)ᵀ`` and ``grad_x = grad_y · deq(W)``.

``W [out, in]`` is a ``lowra_kernels.weight.PackedWeight`` (tensors only: rows grouped by
bit-width; see ``lowra_kernels.dequantize`` for the element formula). Three Triton paths, chosen by the activation
row count ``M`` (``forward_path``; on a GPU by measurement: the GEMV at M = 1, or up to 4 at 3-4
bits, dequantize + cuBLAS above, never the fused GEMM, which measured slower everywhere):

* ``M ≤ GEMV_MAX_M`` (decode): ``_lut_gemv_kernel`` — a fused GEMV that reads each packed word
  once, unpacks by constant shifts, looks codes up in a per-row codebook pre-scaled by the group absmax
  once per K step (``group_size`` is a compile-time constant): at 1–2 bits a select tree over entries
  held in registers, at 3–4 bits one shared-memory load per code from a per-step table (``tl.gather``);
  accumulates in a register tile reduced once after the K loop, and writes fp32 split-K
  partials to a workspace that is summed in a fixed order (deterministic; no host sync, so decode
  can be captured in a CUDA graph). One launch per stored bit-width plus the partial sum.
* ``GEMV_MAX_M < M < TRAIN_MIN_M``: ``_lut_mm_kernel`` — a fused tiled ``tl.dot`` GEMM that
  dequantizes W tiles in registers (never writes ``deq(W)``).
* ``M ≥ TRAIN_MIN_M`` (training): ``deq(W)`` is written once to a transient weight in the
  activation dtype by the Triton dequantize kernel and multiplied by cuBLAS (as bitsandbytes'
  4-bit matmul does), then freed: the extra memory peak is one layer's weight.

The backward ``grad_x = grad_y · deq(W)`` always takes the transient-weight + cuBLAS path.
``lut_matmul_ref`` / ``lut_matmul_backward_ref`` are the references (they materialize ``deq(W)``
in the activation dtype transiently). The differentiable op is ``torch.ops.lowra.lut_linear``
(``lowra_kernels.lut_linear``).

Launch path: the GEMV replays a per-layer launch plan (``_gemv_plan``: configs, grids, strides, built
once per weight, device and M bucket) and the dequantize kernel a looked-up config; both configs come
from the shipped per-GPU table (``lowra_kernels.config_table``, keyed by width, group size, M bucket and
``in_features`` — never the stored row count of a bit group — so one tuning serves every layer of a
shape), written by ``python -m lowra_kernels.tune``. The ``autotune`` decorators only declare the config
spaces (for the tuner and ``compile_check``); they run solely for the fused GEMM, which a GPU never takes.
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
from lowra_kernels.dispatch import gemv_v2_enabled, interpreting
from lowra_kernels.gemv_v2 import GEMV_V2_MAX_M
from lowra_kernels.layout import codes_per_word
from lowra_kernels.layout_v2 import v2_supported
from lowra_kernels.lut import gather_groups, gemv_step, lut_select
from lowra_kernels.weight import PackedWeight, WeightCache

GEMV_MAX_M = 16  # forward rows M up to this run the GEMV kernel
TRAIN_MIN_M = 256  # forward rows M from this run dequantize-to-transient + cuBLAS


# ---------------------------------------------------------------------------------------- helpers
def dequantize_transient(w: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``deq(W) [out, in]`` in ``dtype`` by the Triton dequantize kernel (one launch per bit group).

    The output is ``torch.empty``: every row belongs to exactly one bit group (a validated
    weight), so no fill pass is spent on it.
    """
    from lowra_kernels.dequantize import dequantize_triton

    out = torch.empty(w.out_features, w.in_features, dtype=dtype, device=w.device)
    for bits, codes, rows, codebook in w.groups():
        dequantize_triton(codes, rows, codebook, w.absmax, bits, w.group_size, out)
    return out


# ---------------------------------------------------------------------------------------- refs
def lut_matmul_ref(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """Reference forward: ``x [..., in] @ deq(W)ᵀ → [..., out]`` in ``x.dtype``."""
    from lowra_kernels.dequantize import dequantize_weight

    return x @ dequantize_weight(w, x.dtype, "torch").t()


def lut_matmul_backward_ref(grad_y: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """Reference backward: ``grad_y [..., out] @ deq(W) → [..., in]`` in ``grad_y.dtype``."""
    from lowra_kernels.dequantize import dequantize_weight

    return grad_y @ dequantize_weight(w, grad_y.dtype, "torch")


# ---------------------------------------------------------------------------------------- GEMM (16 < M < 256)
def prune_mm_configs(configs: list, named_args: dict, **kwargs: Any) -> list:
    """fp32 activations (``"ieee"`` dots) keep ``BLOCK_K ≤ 32``: deeper fp32 tiles spill on sm_90."""
    if kwargs.get("DOT_PREC", named_args.get("DOT_PREC")) != "ieee":
        return configs
    return [c for c in configs if c.kwargs["BLOCK_K"] <= 32] or configs[:1]


@triton.jit
def _deq_tile(q_ptr, cb_ptr, a_ptr, i, orig, k, mask, group_size, stride_qr, stride_cbr,
              stride_ar, stride_ac, BITS: tl.constexpr, PER_WORD: tl.constexpr):
    """fp32 tile ``[len(i), len(k)]`` of deq(W) for stored rows ``i`` (original rows ``orig``)."""
    word = tl.load(q_ptr + i[:, None] * stride_qr + (k // PER_WORD)[None, :], mask=mask, other=0)
    code = (word >> ((k % PER_WORD) * BITS)[None, :]) & ((1 << BITS) - 1)
    value = tl.load(cb_ptr + i[:, None] * stride_cbr + code, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(a_ptr + orig[:, None] * stride_ar + (k // group_size)[None, :] * stride_ac,
                    mask=mask, other=0.0).to(tl.float32)
    return value * scale


@autotune(
    configs(
        [{"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8},
         {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 8}],
        num_warps=(4,),
        num_stages=(2,),
    )
    + configs([{"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}], num_warps=(8,), num_stages=(2,)),
    key=["M_BUCKET", "K", "BITS", "group_size"],
    prune_configs_by={"early_config_prune": prune_mm_configs},
)
@triton.jit(do_not_specialize=["M_BUCKET"])
def _lut_mm_kernel(
    x_ptr, q_ptr, rows_ptr, cb_ptr, a_ptr, y_ptr, M, M_BUCKET, n_rows, K, group_size,
    stride_xm, stride_xk, stride_qr, stride_cbr, stride_ar, stride_ac, stride_ym, stride_yn,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[m, rows[i]] = Σ_k x[m, k] · deq(W)[i, k] for one [BLOCK_M, BLOCK_N] tile (tl.dot).

    ``M_BUCKET`` (unused in the body) is the power-of-two bucket of ``M``: the autotune key.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(n_rows, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    i = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = m < M
    i_ok = i < n_rows
    orig = tl.load(rows_ptr + i, mask=i_ok, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xt = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :] * stride_xk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = _deq_tile(q_ptr, cb_ptr, a_ptr, i, orig, k, i_ok[:, None] & k_ok[None, :], group_size,
                      stride_qr, stride_cbr, stride_ar, stride_ac, BITS, PER_WORD)
        acc = tl.dot(xt, tl.trans(w.to(x_ptr.dtype.element_ty)), acc, input_precision=DOT_PREC)
    tl.store(y_ptr + m[:, None] * stride_ym + orig[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & i_ok[None, :])


# ---------------------------------------------------------------------------------------- GEMV (M ≤ 16)
GEMV_BLOCK_M = (1, 4, 16)  # M buckets of the GEMV: M=1, 2-4, 5-16 (one binary each)
# fp32 products BLOCK_M * BLOCK_N * (codes per K step) of a GEMV tile: configs keep budget/4 .. budget
# (larger tiles spill on sm_90, smaller ones under-use the block); 3/4-bit trees need more registers.
GEMV_TILE_BUDGET = {1: 4096, 2: 4096, 3: 2048, 4: 2048}
# 3/4-bit steps looked up by gather (``lut.gather_groups``) hold no select tree: larger tiles fit, and
# small ones win (H200, 4096×11008, M=1: 4 bits BLOCK_N=8 × 64 codes 40.9 µs vs 60.0 for 32 × 64)
GEMV_GATHER_TILE_BUDGET = 8192
GEMV_GATHER_TILE_FLOOR = 512


def m_bucket(m: int) -> int:
    """Power-of-two bucket of the activation row count (autotune key: one tuning per bucket)."""
    return 1 if m <= 1 else 1 << (int(m) - 1).bit_length()


def gemv_block_m(m: int) -> int:
    """The GEMV's M tile for ``m ≤ GEMV_MAX_M`` rows: the smallest of ``GEMV_BLOCK_M`` that holds m."""
    for b in GEMV_BLOCK_M:
        if m <= b:
            return b
    raise ValueError(f"the GEMV runs M ≤ {GEMV_BLOCK_M[-1]} rows, got {m}")


def prune_gemv_configs(configs: list, named_args: dict, **kwargs: Any) -> list:
    """Keep GEMV configs whose ``[BLOCK_M, BLOCK_N, K step]`` fp32 tile is within
    ``[budget / 4, budget]`` of ``GEMV_TILE_BUDGET[BITS]`` (select tree) or within
    ``[GEMV_GATHER_TILE_FLOOR, GEMV_GATHER_TILE_BUDGET]`` (gathered 3/4 bits); never returns an empty list."""
    def arg(name: str, default: int) -> int:
        return kwargs.get(name, named_args.get(name, default))

    bits = arg("BITS", 2)
    gather = gather_groups(bits, arg("WORDS", 4), arg("ALIGNED", True), arg("GROUP", 64))
    budget = GEMV_GATHER_TILE_BUDGET if gather else GEMV_TILE_BUDGET[bits]
    floor = GEMV_GATHER_TILE_FLOOR if gather else budget // 4
    step = arg("WORDS", 4) * arg("PW2", 16)
    tile = {id(c): arg("BLOCK_M", 1) * c.kwargs["BLOCK_N"] * step for c in configs}
    keep = [c for c in configs if floor <= tile[id(c)] <= budget]
    keep = keep or [min(configs, key=lambda c: (tile[id(c)], c.kwargs["SPLIT_K"]))]
    return [_with_register_cap(c, tile[id(c)], bits) for c in keep]


def _with_register_cap(config: Any, tile: int, bits: int) -> Any:
    """Small GEMV tiles get ``maxnreg=128``: left alone, ptxas settles on 64-80 registers and spills
    a few bytes there (gathered 3-bit tiles of 4096 products on sm_80: 8 B at 80 registers, none at
    96 under the cap); large tiles (and 3/4-bit select trees of 2048 products) need more than 128 and
    must stay uncapped. Found by ``lowra_kernels.compile_check`` on sm_90 and sm_80."""
    cap = 128 if tile <= 1024 or (tile <= 2048 and bits <= 2) or (2048 < tile <= 4096 and bits >= 3) else None
    if config.maxnreg == cap:
        return config
    return triton.Config(dict(config.kwargs), num_warps=config.num_warps, num_stages=config.num_stages,
                         maxnreg=cap)


@triton.jit
def _gather_products(x_ptr, m4, stride_xm, M, K, word4, w, g0, tab_flat, row_base,
                     S0: tl.constexpr, SW: tl.constexpr, BITS: tl.constexpr, PER_WORD: tl.constexpr,
                     GROUP: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
    """``x[m, k] · table[row, code(k)]`` for the codes ``S0 ≤ s < S0 + SW`` of each word (``SW`` a power
    of two): ``[BLOCK_M, BLOCK_N, WORDS, SW]``. 3-bit words (10 codes) run as 8 + 2, so no lane is padding."""
    s = S0 + tl.arange(0, SW)[None, None, None, :]
    k = w[None, None, :, None] * PER_WORD + s  # [1, 1, WORDS, SW]
    k_ok = k < K
    code = (word4 >> (s * BITS)) & ((1 << BITS) - 1)
    if not ALIGNED:  # entries h·N_CODES.. of the row's table hold the step's group g0 + h
        code += (k // GROUP - g0) * (1 << BITS)
    idx = tl.reshape(tl.broadcast_to(code + row_base, [1, BLOCK_N, WORDS, SW]), [BLOCK_N * WORDS * SW])
    v = tl.reshape(tl.gather(tab_flat, idx, 0), [1, BLOCK_N, WORDS, SW])
    # x once per (activation row, code), converted once and broadcast over the weight rows
    xt = tl.load(x_ptr + m4 * stride_xm + k, mask=(m4 < M) & k_ok, other=0.0)
    return xt.to(tl.float32) * v


# The shipped GEMV space (first = the interpreter's), pruned per tile by ``prune_gemv_configs``.
GEMV_CONFIGS = configs(
    # the last three from a BLOCK_N × SPLIT_K × warps sweep on an H200 (experiments.bench.gpu_profile --sweep,
    # 4096×11008, M=1): 1-2 bits want SPLIT_K=8 (64×8: 17.7 / 23.5 µs vs 20.6 / 29.1 for the best of
    # the first five), 4 bits 8×8 (40.9 µs vs 60.0)
    [{"BLOCK_N": 8, "SPLIT_K": 2}, {"BLOCK_N": 32, "SPLIT_K": 1}, {"BLOCK_N": 32, "SPLIT_K": 4},
     {"BLOCK_N": 64, "SPLIT_K": 2}, {"BLOCK_N": 4, "SPLIT_K": 4}, {"BLOCK_N": 64, "SPLIT_K": 8},
     {"BLOCK_N": 8, "SPLIT_K": 8}, {"BLOCK_N": 16, "SPLIT_K": 4}],
    num_warps=(4,),
    num_stages=(2,),
)


@autotune(
    GEMV_CONFIGS,
    key=["K", "BITS", "GROUP", "BLOCK_M"],
    prune_configs_by={"early_config_prune": prune_gemv_configs},
)
@triton.jit
def _lut_gemv_kernel(
    x_ptr, q_ptr, rows_ptr, cb_ptr, a_ptr, ws_ptr, M, n_rows, K, n_split,
    stride_xm, stride_qr, stride_cbr, stride_ar, stride_ac, stride_ws_s, stride_ws_m,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, PW2: tl.constexpr, WORDS: tl.constexpr,
    ALIGNED: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """ws[pid_k, m, rows[i]] = Σ_{k in this program's K steps} x[m, k] · deq(W)[i, k].

    Tiles are 4-D ``[BLOCK_M, BLOCK_N, WORDS, PW2]`` (activation row, weight row, word, code in
    word): each row's ``WORDS`` int32 words are loaded once (contiguous: vector loads), codes come
    out by constant shifts, the codebook lookup is a select tree over entries loaded per row (and,
    when aligned, pre-multiplied by the row's group scale and rounded to the activation dtype once
    per step, which equals rounding each product) — or, at 3/4 bits (``GATHER``), a gather from a
    per-step table of the codebook times each scale group the step touches (``_gather_products``) —
    and products accumulate in 4-D fp32 tiles that are reduced once after the loop. Slices
    ``SPLIT_K ≤ s < n_split`` of ``ws`` are zeroed by the ``pid_k = 0`` programs, so the caller
    sums a fixed ``n_split`` slices (deterministic).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    act = x_ptr.dtype.element_ty
    i = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = i < n_rows
    orig = tl.load(rows_ptr + i, mask=i_ok, other=0).to(tl.int64)
    i64 = i.to(tl.int64)
    q_row = q_ptr + i64[:, None] * stride_qr  # [BLOCK_N, 1]
    row_ok4 = i_ok[None, :, None, None]
    cb_row = cb_ptr + i64[None, :, None, None] * stride_cbr  # [1, BLOCK_N, 1, 1]
    a_row = a_ptr + orig[None, :, None, None] * stride_ar
    m4 = tl.arange(0, BLOCK_M)[:, None, None, None]
    w_in = tl.arange(0, WORDS)
    s4 = tl.arange(0, PW2)[None, None, None, :]
    shift = s4 * BITS
    n_words = tl.cdiv(K, PER_WORD)
    # 3/4-bit: the codebook lookup is a gather from a per-step table in shared memory (below) when a
    # K step spans at most four scale groups; 1/2-bit (and tiny groups) keep the register select tree.
    SPAN: tl.constexpr = 1 if ALIGNED else (WORDS * PER_WORD - 1) // GROUP + 2  # ≥ groups one step touches
    NG: tl.constexpr = 1 if SPAN == 1 else (2 if SPAN <= 2 else 4)  # table groups (a power of two)
    GATHER: tl.constexpr = BITS >= 3 and SPAN <= 4
    N_CODES: tl.constexpr = 1 << BITS
    TABLE: tl.constexpr = N_CODES * NG  # entries per row: the codebook scaled by each group of the step
    if GATHER:
        e2 = tl.arange(0, TABLE)[None, :]  # [1, TABLE]: entry e of group e // N_CODES of the step
        cb2 = tl.load(cb_ptr + i64[:, None] * stride_cbr + (e2 % N_CODES), mask=i_ok[:, None],
                      other=0.0).to(tl.float32)  # [BLOCK_N, TABLE], loaded once
        a2 = a_ptr + orig[:, None] * stride_ar
        row_base = (tl.arange(0, BLOCK_N) * TABLE)[None, :, None, None]  # row's slice of the flat table
    # gather: codes 0..SW1-1 of each word, then SW1..PER_WORD-1 (3-bit: 8 + 2; 4-bit: 8 + none)
    SW1: tl.constexpr = PW2 if PW2 <= PER_WORD else PW2 // 2
    SW2: tl.constexpr = PER_WORD - SW1 if GATHER else 0
    SW2P: tl.constexpr = SW2 if SW2 > 0 else 1
    acc = tl.zeros([BLOCK_M, BLOCK_N, WORDS, SW1 if GATHER else PW2], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N, WORDS, SW2P], dtype=tl.float32)
    for w0 in range(pid_k * WORDS, n_words, WORDS * SPLIT_K):
        w = w0 + w_in
        word = tl.load(q_row + w[None, :], mask=i_ok[:, None] & (w < n_words)[None, :], other=0)
        word4 = word[None, :, :, None]  # [1, BLOCK_N, WORDS, 1]: code s sits at bits shift[s]...
        k = w[None, None, :, None] * PER_WORD + s4  # [1, 1, WORDS, PW2]
        k_ok = k < K
        if not ALIGNED:
            k_ok = k_ok & (s4 < PER_WORD)
        if GATHER:
            # table[row, h * N_CODES + c] = codebook[row, c] · scale[row, g0 + h] rounded to the activation
            # dtype (h < NG; 0 when aligned): one product per row and entry per step, then each code is
            # one shared-memory load (the flat 1-D gather spans all warps, so Triton stages it in smem)
            g0 = (w0 * PER_WORD) // GROUP
            g2 = g0 + e2 // N_CODES
            sc = tl.load(a2 + g2 * stride_ac, mask=i_ok[:, None] & (g2 * GROUP < K), other=0.0)
            tab = tl.reshape((cb2 * sc.to(tl.float32)).to(act).to(tl.float32), [BLOCK_N * TABLE])
            acc += _gather_products(x_ptr, m4, stride_xm, M, K, word4, w, g0, tab, row_base, 0, SW1, BITS,
                                    PER_WORD, GROUP, ALIGNED, BLOCK_N, WORDS)
            if SW2 > 0:
                acc2 += _gather_products(x_ptr, m4, stride_xm, M, K, word4, w, g0, tab, row_base, SW1, SW2P,
                                         BITS, PER_WORD, GROUP, ALIGNED, BLOCK_N, WORDS)
        else:
            if ALIGNED:
                scale = tl.load(a_row + ((w0 * PER_WORD) // GROUP) * stride_ac, mask=row_ok4, other=0.0)
                v = lut_select(word4, shift, cb_row, scale.to(tl.float32), row_ok4, 0, 1 << BITS, BITS - 1, True,
                               act)
            else:
                v = lut_select(word4, shift, cb_row, 1.0, row_ok4, 0, 1 << BITS, BITS - 1, False, act)
                scale = tl.load(a_row + (k // GROUP) * stride_ac, mask=row_ok4 & k_ok, other=0.0)
                v = (v * scale.to(tl.float32)).to(act).to(tl.float32)
            # x is loaded at the full tile shape (rows broadcast, L1 hits) so that the load fixes a
            # layout with each thread holding consecutive codes of one word (16-byte vectors).
            x_ptrs = tl.broadcast_to(x_ptr + m4 * stride_xm + k, [BLOCK_M, BLOCK_N, WORDS, PW2])
            xt = tl.load(x_ptrs, mask=(m4 < M) & k_ok, other=0.0)
            acc += xt.to(tl.float32) * v
    part = tl.sum(tl.sum(acc, axis=3), axis=2)  # [BLOCK_M, BLOCK_N]
    if GATHER and SW2 > 0:
        part += tl.sum(tl.sum(acc2, axis=3), axis=2)
    m2 = tl.arange(0, BLOCK_M)[:, None]
    ptrs = ws_ptr + m2 * stride_ws_m + orig[None, :]
    mask = (m2 < M) & i_ok[None, :]
    tl.store(ptrs + pid_k * stride_ws_s, part, mask=mask)
    if pid_k == 0:
        for s in range(SPLIT_K, n_split):
            tl.store(ptrs + s * stride_ws_s, tl.zeros_like(part), mask=mask)


# ---------------------------------------------------------------------------------------- launchers
def _group_args(codes: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    codes = codes if codes.stride(-1) == 1 else codes.contiguous()
    codebook = codebook if codebook.stride(-1) == 1 else codebook.contiguous()
    stride_cbr = 0 if codebook.shape[0] == 1 else codebook.stride(0)
    return codes, codebook, stride_cbr


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_activation(t: torch.Tensor, features: int, what: str) -> None:
    if t.shape[-1] != features:
        raise ValueError(f"{what} has {t.shape[-1]} features, the weight expects {features}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton LUT matmul runs fp32/fp16/bf16 activations, got {t.dtype}")


@functools.cache
def gemv_config(device_name: str, bits: int, group: int, block_m: int, in_features: int) -> dict:
    """Meta-parameters of the GEMV for one width: the shipped table's (``lowra_kernels.config_table``), or
    the first config the autotuner's pruning keeps (warned once per key: no tuning at call time). The
    interpreter (``device_name`` ``""``) takes ``GEMV_CONFIGS[0]``, as its autotuner does."""
    if not device_name:
        return config_meta(GEMV_CONFIGS[0])
    tuned = lookup(device_name, "gemv", bits, group, in_features, block_m)
    if tuned is not None:
        return tuned
    words, pw2, aligned = gemv_step(bits, group)
    kept = prune_gemv_configs(list(GEMV_CONFIGS), {}, BITS=bits, BLOCK_M=block_m, WORDS=words, PW2=pw2,
                              ALIGNED=aligned, GROUP=group)
    warnings.warn(f"no tuned GEMV config for {device_name} ({bits} bits, group {group}, M bucket {block_m}, "
                  f"in {in_features}): using {kept[0].kwargs}; `python -m lowra_kernels.tune` writes one",
                  RuntimeWarning, stacklevel=2)
    return config_meta(kept[0])


def _gemv_plan(w: PackedWeight, block_m: int, dev: str) -> tuple[int, list[tuple]]:
    """The GEMV launches of one layer for an M bucket: ``(n_split, [(grid, ints, meta), …])`` per stored
    width — resolved configs, grids and strides, built once (``_plans``) and replayed per call. Ints only:
    the cache holds no tensor of the weight, so a freed weight's plans go with it."""
    configs = {b: gemv_config(dev, b, w.group_size, block_m, w.in_features) for b in w.bits}
    n_split = max(c["SPLIT_K"] for c in configs.values())
    launches = []
    for bits, codes, rows, codebook in w.groups():
        words, pw2, aligned = gemv_step(bits, w.group_size)
        codes, codebook, stride_cbr = _group_args(codes, codebook)
        cfg, n = configs[bits], rows.shape[0]
        meta = dict(cfg, BITS=bits, PER_WORD=codes_per_word(bits), PW2=pw2, WORDS=words, ALIGNED=aligned,
                    GROUP=w.group_size, BLOCK_M=block_m)
        ints = (n, w.in_features, n_split, codes.stride(0), stride_cbr, w.absmax.stride(0), w.absmax.stride(1))
        launches.append(((triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"]), ints, meta))
    return n_split, launches


_plans = WeightCache()
_V2_CACHE = WeightCache()  # a weight's layout-v2 groups (GEMV v2, opt-in: dispatch.gemv_v2_enabled)


def _lut_gemv(x2: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """GEMV forward for ``x2 [M ≤ GEMV_MAX_M, in]`` (contiguous) → ``[M, out]`` in ``x2.dtype``: replays the
    layer's launch plan for this M bucket (built on first use)."""
    M = x2.shape[0]
    block_m = gemv_block_m(M)
    dev = device_name(x2)
    n_split, launches = _plans.get(w, ("gemv", dev, x2.device, block_m), lambda: _gemv_plan(w, block_m, dev))
    ws = torch.empty(n_split, M, w.out_features, dtype=torch.float32, device=x2.device)
    for (grid, (n, k, splits, s_qr, s_cbr, s_ar, s_ac), meta), (_, codes, rows, codebook) in zip(launches,
                                                                                               w.groups()):
        codes, codebook, _ = _group_args(codes, codebook)
        _lut_gemv_kernel.fn[grid](x2, codes, rows, codebook, w.absmax, ws, M, n, k, splits, x2.stride(0), s_qr,
                                  s_cbr, s_ar, s_ac, ws.stride(0), ws.stride(1), **meta)
    y = ws[0] if n_split == 1 else ws.sum(0)
    return y.to(x2.dtype)


def _lut_mm(x2: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """Fused tiled forward for ``x2 [M, in]`` → ``[M, out]`` in ``x2.dtype`` (tl.dot)."""
    M = x2.shape[0]
    y = torch.empty(M, w.out_features, dtype=x2.dtype, device=x2.device)
    absmax = w.absmax
    for bits, codes, rows, codebook in w.groups():
        n = rows.shape[0]
        codes, codebook, stride_cbr = _group_args(codes, codebook)

        def grid(meta, n=n):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _lut_mm_kernel[grid](
            x2, codes, rows, codebook, absmax, y, M, m_bucket(M), n, w.in_features, w.group_size,
            x2.stride(0), x2.stride(1), codes.stride(0), stride_cbr, absmax.stride(0),
            absmax.stride(1), y.stride(0), y.stride(1),
            BITS=bits, PER_WORD=codes_per_word(bits), DOT_PREC=_dot_precision(x2.dtype),
        )
    return y


# Largest M the GEMV serves on a GPU, per stored bit-width; above it dequantize + cuBLAS is faster.
# H200, 4096×11008 and 11008×4096, bf16 (experiments.bench.gpu_profile --sweep, graph-replay µs, 2 bits):
# GEMV M=1 32.5 / M=2-4 93 vs dequantize + cuBLAS 67 at any M ≤ 32; at 3 bits M=4 90 vs 191. The fused
# tl.dot kernel was slower than dequantize + cuBLAS at every M from 1 to 256 and every width (261-1289 µs
# vs 59-207), so a GPU never takes it.
GPU_GEMV_MAX_M = {1: 1, 2: 1, 3: 4, 4: 4}


def forward_path(m: int, w: PackedWeight, on_gpu: bool) -> str:
    """``"gemv"``, ``"fused_mm"`` or ``"dequant_blas"`` for ``m`` activation rows.

    On a GPU the choice is the measured one (``GPU_GEMV_MAX_M``, the smallest over the stored widths;
    never the fused GEMM). Elsewhere (the Triton interpreter, forced ``backend="triton"`` on a CPU) the
    row-count regimes ``GEMV_MAX_M`` / ``TRAIN_MIN_M`` hold, so every kernel stays exercised by the tests.
    """
    if on_gpu:
        return "gemv" if m <= min((GPU_GEMV_MAX_M[b] for b in w.bits), default=1) else "dequant_blas"
    if m <= GEMV_MAX_M:
        return "gemv"
    return "fused_mm" if m < TRAIN_MIN_M else "dequant_blas"


def _gemv_v2(x2: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """GEMV v2 of ``x2 [M ≤ 4, in]``: the weight restructured into layout v2 once (cached while its
    tensors live unchanged), then ``gemv_v2``."""
    from lowra_kernels.gemv_v2 import gemv_v2
    from lowra_kernels.layout_v2 import groups_to_v2

    groups = _V2_CACHE.get(w, ("v2", x2.device), lambda: groups_to_v2(
        [(b, codes, rows, cb) for b, codes, rows, cb in w.groups()], w.absmax, w.group_size, w.in_features))
    return gemv_v2(x2, groups, w.out_features)


def lut_matmul_triton(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """Triton forward ``x [..., in] → y [..., out]``: GEMV, fused GEMM, or dequantize + cuBLAS, as
    ``forward_path`` chooses."""
    _check_activation(x, w.in_features, "x")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*lead, w.out_features)
    path = forward_path(M, w, x2.is_cuda and not interpreting())
    if path == "gemv" and gemv_v2_enabled() and M <= GEMV_V2_MAX_M and v2_supported(w.group_size):
        y = _gemv_v2(x2, w)
    elif path == "gemv":
        y = _lut_gemv(x2, w)
    elif path == "fused_mm":
        y = _lut_mm(x2, w)
    else:
        wt = dequantize_transient(w, x.dtype)
        y = x2 @ wt.t()
        del wt
    return y.reshape(*lead, w.out_features)


def lut_matmul_backward_triton(grad_y: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """Triton backward ``grad_y [..., out] → grad_x [..., in]``: transient ``deq(W)`` + cuBLAS."""
    _check_activation(grad_y, w.out_features, "grad_y")
    lead = grad_y.shape[:-1]
    gy = grad_y.reshape(-1, w.out_features)
    if gy.shape[0] == 0:
        return grad_y.new_zeros(*lead, w.in_features)
    wt = dequantize_transient(w, grad_y.dtype)
    gx = gy @ wt
    del wt
    return gx.reshape(*lead, w.in_features)


def lut_matmul(x: torch.Tensor, w: PackedWeight, backend: str = "auto") -> torch.Tensor:
    """Dispatching forward ``y = x · deq(W)ᵀ``: ``x [..., in]`` → ``[..., out]`` in ``x.dtype``.

    Not differentiable by itself: ``torch.ops.lowra.lut_linear`` (``lowra_kernels.lut_linear``) is
    the differentiable op.
    """
    from lowra_kernels.dispatch import resolve

    kind = resolve(backend, x)
    if kind == "triton":
        return lut_matmul_triton(x, w)
    if kind == "cpu":
        from lowra_kernels.cpu_backend import lut_matmul_cpu

        return lut_matmul_cpu(x, w)
    return lut_matmul_ref(x, w)


def lut_matmul_backward(grad_y: torch.Tensor, w: PackedWeight, backend: str = "auto") -> torch.Tensor:
    """Dispatching backward ``grad_x = grad_y · deq(W)``: ``[..., out]`` → ``[..., in]``."""
    from lowra_kernels.dispatch import resolve

    kind = resolve(backend, grad_y)
    if kind == "triton":
        return lut_matmul_backward_triton(grad_y, w)
    if kind == "cpu":
        from lowra_kernels.cpu_backend import lut_matmul_backward_cpu

        return lut_matmul_backward_cpu(grad_y, w)
    return lut_matmul_backward_ref(grad_y, w)
