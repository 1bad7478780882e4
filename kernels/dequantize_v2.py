"""Dequantize v2 on layout v2: ``out[rows[i], k] = codebook[i, code[i, k]] · scale[k // G, i]``, rounded once.

One program takes ``BLOCK_R`` rows × ``TILES`` K tiles of 128 codes (``BLOCK_R · TILES · 128`` outputs:
16 KB and more in bf16). The row's codebook is loaded once per program; per tile each row's words
are loaded as whole 16-byte vectors and unpacked by constant shifts; 1–2 bits look codes up by a
register select tree (``lut_v2.select``), 3–4 bits by ``tl.gather`` from a transposed table built
once per program; each value is one fp32 multiply by its group scale and one rounding to the
output dtype — bit-exact with ``dequantize_v2_ref`` (= ``dequantize_ref``). Each row's 128 outputs
of a tile are contiguous, written as 16-byte stores; ``EVEN_K`` (K a multiple of 128) drops the
column mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowra_kernels.layout_v2 import TILE, V2Group, dequantize_v2_ref
from lowra_kernels.lut_v2 import chunk_codes, chunk_words, gather_lookup, gather_table, leaves, select

# (BLOCK_R, TILES, num_warps) per bit-width: ≥ 16 KB of bf16 output per program
DEQUANT_V2_CONFIG = {1: (32, 2, 4), 2: (32, 2, 4), 3: (32, 2, 4), 4: (32, 2, 4)}

__all__ = ["dequantize_v2", "dequantize_v2_ref", "DEQUANT_V2_CONFIG"]


@triton.jit
def _dequantize_v2_kernel(
    q_ptr, cb_ptr, s_ptr, rows_ptr, out_ptr, n_rows, K, tiles,
    stride_qt, stride_cbr, stride_sg, stride_or,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, TILES: tl.constexpr, EVEN_K: tl.constexpr,
):
    """out[rows[i], k] for the program's BLOCK_R rows and TILES tiles."""
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    out_ty = out_ptr.dtype.element_ty
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < n_rows
    orig = tl.load(rows_ptr + r, mask=r_ok, other=0).to(tl.int64)
    o_row = out_ptr + orig[:, None, None] * stride_or
    r2 = r[:, None]
    r_ok2 = r_ok[:, None]
    CPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS  # codes per (low-plane) word
    GT: tl.constexpr = 128 // GROUP if GROUP < 128 else 1  # scale groups per tile
    CPG: tl.constexpr = 128 // GT
    WPG: tl.constexpr = CPG // CPW if CPG >= CPW else 1
    shift = (tl.arange(0, CPW) * BITS)[None, None, :]
    wk = (tl.arange(0, WPG)[:, None] * CPW + tl.arange(0, CPW)[None, :])[None, :, :]  # [1, WPG, CPW]
    if BITS <= 2:
        e0, e1, e2, e3 = leaves(cb_ptr, r, r_ok, stride_cbr, BITS)
    else:
        table = gather_table(cb_ptr, r, r_ok, stride_cbr, BITS, BLOCK_R)
    for step in tl.static_range(TILES):
        t = pid_t * TILES + step
        if t < tiles:
            q_tile = q_ptr + t * stride_qt
            for h in tl.static_range(GT):
                g = (t * 128 + h * CPG) // GROUP
                g_ok = (tl.zeros_like(r2) + g * GROUP) < K  # the last tile may reach past the last group
                sc = tl.load(s_ptr + g * stride_sg + r2, mask=r_ok2 & g_ok, other=0.0).to(tl.float32)  # [BLOCK_R, 1]
                if BITS <= 2:  # leaves × scale rounded once (4 per row): selection commutes with rounding
                    word = chunk_words(q_tile, r, r_ok, h, BITS, WPG)
                    w = select(word, shift, (e0 * sc).to(out_ty)[:, :, None], (e1 * sc).to(out_ty)[:, :, None],
                               (e2 * sc).to(out_ty)[:, :, None], (e3 * sc).to(out_ty)[:, :, None], BITS)
                else:
                    codes = chunk_codes(q_tile, r, r_ok, h, BITS, WPG, CPW)
                    w = (gather_lookup(table, codes, BLOCK_R, WPG, CPW) * sc[:, :, None]).to(out_ty)
                k = t * 128 + h * CPG + wk
                if EVEN_K:
                    tl.store(o_row + k, w, mask=r_ok[:, None, None])
                else:
                    tl.store(o_row + k, w, mask=r_ok[:, None, None] & (k < K))


def dequantize_v2(g: V2Group, out: torch.Tensor) -> torch.Tensor:
    """Write the dequantized rows of one v2 group into ``out [out_features, in_features]`` (row-major;
    other rows untouched) and return it. Bit-exact with ``dequantize_v2_ref``."""
    if out.dim() != 2 or out.shape[1] != g.in_features:
        raise ValueError(f"out must be [out_features, {g.in_features}], got {tuple(out.shape)}")
    if out.stride(1) != 1:
        raise ValueError("dequantize_v2 writes a row-major output (stride 1 along in_features)")
    if g.n_rows == 0:
        return out
    block_r, tiles_per, warps = DEQUANT_V2_CONFIG[g.bits]
    stride_cbr = 0 if g.codebook.shape[0] == 1 else g.codebook.stride(0)
    _dequantize_v2_kernel[(triton.cdiv(g.n_rows, block_r), triton.cdiv(g.tiles, tiles_per))](
        g.codes, g.codebook, g.scales, g.rows, out, g.n_rows, g.in_features, g.tiles,
        g.codes.stride(0), stride_cbr, g.scales.stride(0), out.stride(0),
        BITS=g.bits, GROUP=g.group_size, BLOCK_R=block_r, TILES=tiles_per, EVEN_K=g.in_features % TILE == 0,
        num_warps=warps, num_stages=1,
    )
    return out
