"""OPTQ / GPTQ (Frantar et al. 2023) in LowRA's format: ModuLoRA's black-box quantizer.

OPTQ quantizes a weight ``W [out, in]`` one input column at a time and pushes each column's
rounding error onto the columns not yet quantized, weighted by the inverse of the layer's input
Hessian ``H = XᵀX / n`` (``X [n, in]``: calibration activations of the layer). It minimizes the
layer's OUTPUT error ``‖XWᵀ − XŴᵀ‖`` rather than the weight error. Implementation follows the GPTQ
reference code: damping ``λ = damp · mean(diag H)``, the upper Cholesky factor of ``H⁻¹``, lazy
batch updates in blocks of ``block_size`` columns, optional act-order (columns in decreasing
``diag H``), dead inputs (``H[i, i] = 0``) quantized by plain rounding.

The result is a ``QuantizedTensor`` in the shared format, element = ``table[code] · absmax[row,
col // group_size]``:

* Decision (grid): the quantization grid is one table shared by all rows in the absmax-normalized
  space; default ``grid="uniform"`` = ``uniform_table(b)``, ``2**b`` evenly spaced points spanning
  [-1, 1] (no zero point; the ``uniform`` round-to-nearest quantizer uses the same grid, so OPTQ vs
  RTN isolates the error feedback). ``grid="nf"`` uses the NormalFloat table; any sorted tensor
  ``[1 or out, 2**b]`` is accepted too (e.g. LowRA's learned per-row codebooks).
  GPTQ's own asymmetric min/max grid with a per-group zero point does not fit the format (which
  has no per-group offset); the symmetric absmax grid is the one that does.
* Decision (scales): the group absmax is computed from the ORIGINAL weight before the OPTQ loop,
  rounded to its stored form (fp16, or double-quantized) and then fixed ("static groups"), so it
  is exactly what the format stores, and act-order does not change the groups.
* The codes OPTQ decides are packed as they are (no re-quantization of the updated weight), and
  the Ŵ that drives the error feedback is computed with the dequantize kernel's arithmetic
  (fp16 table → fp32, times the fp32 restored absmax), so ``qt.dequantize()`` equals Ŵ bit for
  bit (``optq_quantize`` returns both; tested).

Calibration: pass ``hessian=H [in, in]`` (e.g. from ``lowra.calibration.collect_hessians``) or
``inputs=X [..., in]``. Decision: the Hessians are collected once through the full-precision
model (not layer by layer through the partly quantized one, as the GPTQ scripts do), which keeps
the quantizer a per-layer black box as ModuLoRA requires.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowra.format import BitGroup, QuantizedTensor, midpoints
from lowra.normalfloat import normal_float_table
from lowra.quantizers import register_quantizer
from lowra.quantizers.base import Quantizer
from lowra.quantizers.uniform import uniform_table
from lowra.scales import GroupScales, compute_absmax
from lowra.validation import check_bits, check_group_size, check_weight
from lowra_kernels.pack import pack

__all__ = ["OPTQQuantizer", "OPTQResult", "hessian_from_inputs", "optq_quantize", "output_error"]

DAMP_RETRIES = 6


@dataclass
class OPTQResult:
    """Output of ``optq_quantize``.

    Attributes:
        qweight: the packed ``QuantizedTensor``.
        dequantized: fp32 ``[out, in]`` Ŵ built during the loop (== ``qweight.dequantize()``).
        codes: int64 ``[out, in]`` chosen codes (indices into the table).
        damp: the relative damping finally used (raised ×10 when H + λI was not positive definite).
        proxy_loss: ``Σ_j ‖w_j − ŵ_j‖² / (2 [H⁻¹]_jj)`` accumulated by OPTQ (its own objective).
    """

    qweight: QuantizedTensor
    dequantized: torch.Tensor
    codes: torch.Tensor
    damp: float
    proxy_loss: float


def hessian_from_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """float64 ``XᵀX / n`` ``[in, in]`` of activations ``inputs [..., in]`` (n = rows of X)."""
    x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64)
    if x.shape[0] == 0:
        raise ValueError("OPTQ calibration inputs are empty")
    return x.T @ x / x.shape[0]


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output error ``‖XWᵀ − XŴᵀ‖² / n = tr(D H Dᵀ)``, ``D = W − Ŵ``, ``H = XᵀX/n``."""
    d = (weight.to(torch.float64) - approx.to(torch.float64))
    return float(((d @ hessian.to(d.device, torch.float64)) * d).sum())


def _grid(grid: str | torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Stored-precision sorted table ``[1 or out, 2**bits]`` (fp16 values held in fp32)."""
    if isinstance(grid, torch.Tensor):
        table = grid.detach().to(torch.float32)
        if table.dim() == 1:
            table = table[None]
    elif grid == "uniform":
        table = uniform_table(bits)[None]
    elif grid == "nf":
        table = normal_float_table(bits)[None]
    else:
        raise ValueError(f"OPTQ grid must be 'uniform', 'nf' or a tensor [1 or out, 2**b], got {grid!r}")
    if table.dim() != 2 or table.shape[1] != 1 << bits or table.shape[0] not in (1, out_features):
        raise ValueError(f"OPTQ {bits}-bit grid must have shape [1 or {out_features}, {1 << bits}], "
                         f"got {tuple(table.shape)}")
    return table.to(torch.float16).to(torch.float32).sort(dim=1).values


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` (float64), raising λ ×10 until H + λI is PD."""
    diag_mean = float(torch.diagonal(hessian).mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for _ in range(DAMP_RETRIES):
        L, info = torch.linalg.cholesky_ex(hessian + damp * diag_mean * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return U, damp
        damp *= 10.0
    raise ValueError(f"OPTQ: the calibration Hessian is not positive definite even with damping {damp / 10:g}; "
                     "use more calibration data or a larger `damp`")


def optq_quantize(
    weight: torch.Tensor,
    bits: int,
    hessian: torch.Tensor,
    group_size: int = 64,
    double_quant: bool = False,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    grid: str | torch.Tensor = "uniform",
    backend: str = "auto",
) -> OPTQResult:
    """OPTQ-quantize ``weight [out, in]`` at ``bits`` with the input Hessian ``hessian [in, in]``.

    Args:
        weight: full-precision weight (any float dtype; computed in fp32).
        bits: code width in {1, 2, 3, 4} (the ``optq`` method accepts 2, 3, 4).
        hessian: ``XᵀX / n`` of the layer's inputs (any positive scale; float64 recommended).
        group_size, double_quant: absmax grouping and storage (fixed from the original weight).
        damp: relative damping λ / mean(diag H) (GPTQ's ``percdamp``, 0.01).
        act_order: process columns in decreasing ``diag H`` (GPTQ's ``--act-order``).
        block_size: columns per lazy batch update (GPTQ: 128).
        grid: ``"uniform"`` (default), ``"nf"`` or a table ``[1 or out, 2**bits]``.
    Returns:
        ``OPTQResult`` with the packed tensor and Ŵ (bit-exact with its ``dequantize()``).
    """
    check_weight(weight)
    bits = check_bits(bits)
    group_size = check_group_size(group_size)
    _check_optq_inputs(weight, hessian, damp, block_size)
    out_features, in_features = weight.shape
    device = weight.device
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=device, dtype=torch.float64).clone()
    H = (H + H.T) / 2

    scales = GroupScales.store(compute_absmax(W, group_size), double_quant)
    absmax = scales.restore()  # exactly what dequantize multiplies by
    col_scale = absmax.repeat_interleave(group_size, dim=1)[:, :in_features]  # [out, in] fp32
    table = _grid(grid, bits, out_features).to(device)  # [1 or out, K]
    thresholds = midpoints(table).contiguous()  # [1 or out, K - 1]
    if thresholds.shape[0] == 1:
        thresholds = thresholds.expand(out_features, -1).contiguous()

    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else None
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
        col_scale = col_scale[:, perm].contiguous()
    Hinv, damp_used = _inverse_cholesky(H, float(damp))
    Hinv = Hinv.to(torch.float32)

    codes, Q, proxy = _quantize_columns(W, Hinv, col_scale, table, thresholds, block_size)
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        Q = Q[:, inv]
    stored_table = table.to(torch.float16)
    group = BitGroup(bits, torch.arange(out_features, dtype=torch.int32, device=device),
                     pack(codes, bits, backend), stored_table)
    qt = QuantizedTensor((out_features, in_features), group_size, [group], scales, method="optq")
    return OPTQResult(qt, Q, codes, damp_used, float(proxy))


def _check_optq_inputs(weight: torch.Tensor, hessian: torch.Tensor, damp: float, block_size: int) -> None:
    """Refuse a bad ``block_size`` or ``damp`` and a Hessian that is not a finite ``[in, in]`` for
    ``weight [out, in]`` (ValueError), before any work is done."""
    if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
        raise ValueError(f"OPTQ block_size must be a positive integer, got {block_size!r}")
    if not 0.0 <= float(damp):
        raise ValueError(f"OPTQ damp must be non-negative, got {damp!r}")
    in_features = weight.shape[1]
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"OPTQ Hessian must be [{in_features}, {in_features}] for a weight "
                         f"{tuple(weight.shape)}, got {tuple(hessian.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("OPTQ Hessian has NaN/Inf values")


def _quantize_columns(W: torch.Tensor, Hinv: torch.Tensor, col_scale: torch.Tensor, table: torch.Tensor,
                      thresholds: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OPTQ's column loop: round each column of ``W [out, in]`` (fp32, modified in place) to the grid
    and push its error onto the columns not yet quantized, through the upper Cholesky factor of the
    inverse Hessian ``Hinv [in, in]`` (fp32), ``block_size`` columns at a time (GPTQ's lazy batch
    update: within a block column by column, the rest of the matrix once per block).

    ``col_scale [out, in]`` is each weight's absmax, ``table [1 or out, K]`` the grid and
    ``thresholds [out, K - 1]`` its midpoints. Returns ``codes`` int64 ``[out, in]``, ``Q`` fp32
    ``[out, in]`` (Ŵ) and the proxy loss ``Σ_j ‖w_j − ŵ_j‖² / (2 [H⁻¹]_jj)`` (fp32 scalar).
    """
    out_features, in_features = W.shape
    device = W.device
    codes = torch.zeros(out_features, in_features, dtype=torch.int64, device=device)
    Q = torch.zeros_like(W)
    proxy = torch.zeros((), dtype=torch.float32, device=device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            s = col_scale[:, i1 + i]
            x = torch.where(s > 0, w / torch.where(s > 0, s, 1.0), torch.zeros_like(w))
            code = torch.searchsorted(thresholds, x[:, None].contiguous(), right=False)  # [out, 1]
            value = (table[0][code[:, 0]] if table.shape[0] == 1 else table.gather(1, code)[:, 0])
            q = value * s
            codes[:, i1 + i] = code[:, 0]
            Q[:, i1 + i] = q
            d = Hinv1[i, i]
            err = (w - q) / d
            proxy += ((w - q) ** 2).sum() / (2 * d * d)
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, Q, proxy


@register_quantizer
class OPTQQuantizer(Quantizer):
    """OPTQ/GPTQ with calibration data (ModuLoRA's quantizer), uniform width 2, 3 or 4 bits.

    Options (keyword arguments of ``quantize``): ``hessian`` ``[in, in]`` or ``inputs``
    ``[..., in]`` (exactly one, required), ``damp`` (0.01), ``act_order`` (False), ``block_size``
    (128), ``grid`` ("uniform" | "nf" | tensor).
    """

    name = "optq"
    accepted_bits = (2, 3, 4)
    needs_calibration = True

    def quantize(
        self,
        weight: torch.Tensor,
        bits: int | torch.Tensor,
        group_size: int = 64,
        double_quant: bool = False,
        backend: str = "auto",
        *,
        hessian: torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
        damp: float = 0.01,
        act_order: bool = False,
        block_size: int = 128,
        grid: str | torch.Tensor = "uniform",
    ) -> QuantizedTensor:
        """OPTQ-quantize ``weight [out, in]``; see ``optq_quantize`` for the options."""
        check_weight(weight)
        per_row = self.bits_per_row(bits, weight.shape[0])
        widths = torch.unique(per_row).tolist()
        if len(widths) != 1:
            raise ValueError(f"method 'optq' quantizes all rows of a matrix at one width, got {widths}")
        if (hessian is None) == (inputs is None):
            raise ValueError("method 'optq' needs calibration data: pass exactly one of `hessian=` "
                             "([in, in], e.g. from lowra.calibration.collect_hessians) or `inputs=` ([..., in])")
        if hessian is None:
            if inputs.shape[-1] != weight.shape[1]:
                raise ValueError(f"OPTQ inputs have {inputs.shape[-1]} features, the weight has {weight.shape[1]}")
            hessian = hessian_from_inputs(inputs)
        return optq_quantize(weight, int(widths[0]), hessian, group_size, double_quant, damp, act_order,
                             block_size, grid, backend).qweight

    def codebooks(self, weight, bits_per_row, group_size, double_quant, **options):
        """The grid OPTQ rounds to (the codes themselves come from ``quantize``)."""
        return {b: _grid(options.get("grid", "uniform"), b, weight.shape[0])
                for b in torch.unique(bits_per_row).tolist()}
