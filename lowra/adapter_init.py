"""LoftQ initialization for any quantizer: ``W ≈ deq(Q) + s · B @ A`` with ``s = alpha / r``.

Algorithm (LoftQ, Li et al. 2023, METHOD.md §4), T alternations starting from ``B A = 0``:

    Q_t        = quantize(W − s · B_{t−1} A_{t−1})
    R_t        = W − deq(Q_t)
    U Σ Vᵀ     = SVD(R_t), truncated to rank r
    B_t        = U √Σ / √s          [out, r]
    A_t        = √Σ Vᵀ / √s         [r, in]          (so s · B_t A_t = U Σ Vᵀ exactly)

PEFT's LoftQ utility omits the ``1/√s`` factors, which mis-scales the init whenever alpha ≠ r; here
the LoRA scale is accounted for. The quantizer is any callable ``[out, in] fp32 → QuantizedTensor``:
for LowRA it quantizes with the FIXED per-row codebooks and bit-widths of the precision plan (only
the group absmax is recomputed on ``W − s·BA``), so the plan's budget holds inside the loop.

Decision: the iterate with the smallest residual ``‖W − deq(Q) − s·BA‖²`` is returned (LoftQ
returns the last). Iterations are deterministic, so the returned residual never grows with T and is
never above the plain quantization error (iteration 1 already has ``‖R − R_r‖ ≤ ‖R‖``).

Calibrated init (``hessian=H``, ``quant.init=calibrated``): the rank-r fit minimizes the residual
in the activation norm, ``‖(R − s·BA) X‖² = tr((R − s·BA) H (R − s·BA)ᵀ)`` with ``H = XᵀX / n`` from
calibration text, instead of ``‖R − s·BA‖_F``. Closed form (as CLoQ / QERA): with the damped
``H_λ = H + λ·mean(diag H)·I = S Sᵀ`` (``S`` its Cholesky factor), the optimum is
``truncSVD_r(R S) S⁻¹``. The iterate kept is the one with the smallest activation-norm residual;
``sse`` stays the plain Frobenius residual (comparable with LoftQ), ``act_error`` the weighted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lowra.format import QuantizedTensor
from lowra.validation import check_weight

QuantizeFn = Callable[[torch.Tensor], QuantizedTensor]

__all__ = ["ActivationWhitening", "LoftQResult", "loftq_init", "low_rank_factors"]


@dataclass
class LoftQResult:
    """Output of ``loftq_init``.

    Attributes:
        qweight: the quantized base of the returned iterate.
        lora_A: fp32 ``[r, in]`` or None (``iters == 0``: keep the standard LoRA init).
        lora_B: fp32 ``[out, r]`` or None (``iters == 0``).
        sse_quant: ``‖W − deq(quantize(W))‖²`` (plain quantization, no adapters).
        sse: ``‖W − deq(Q) − s·B A‖²`` of the returned init (= ``sse_quant`` when ``iters == 0``).
        history: residual SSE after each iteration (length ``iters``; the activation-norm
            residual for the calibrated init).
        best_iter: 1-based iteration returned (0 when ``iters == 0``).
        act_error: ``tr(D H Dᵀ)`` of the returned residual ``D`` (calibrated init only, else None).
    """

    qweight: QuantizedTensor
    lora_A: torch.Tensor | None
    lora_B: torch.Tensor | None
    sse_quant: float
    sse: float
    history: list[float] = field(default_factory=list)
    best_iter: int = 0
    act_error: float | None = None


def low_rank_factors(residual: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-r factors of ``residual [out, in]``: ``scaling · B @ A`` = its best rank-r fit.

    Returns ``A [r, in]`` and ``B [out, r]`` in fp32.

    Only the top ``r`` singular triplets are computed: the ``r`` largest eigenpairs of the smaller
    Gram ``R Rᵀ`` or ``Rᵀ R`` (float64, ``m = min(out, in)``), the other side's vectors recovered as
    ``Rᵀ u / σ`` (or ``R v / σ``). In float64 that is at least as accurate as an fp32 SVD of ``R``
    for the leading triplets (the squared condition number is taken at 1e-16, not 1e-7), and on the
    CPU LAPACK's partial eigensolver (``dsyevr`` for an index range) costs a small part of a full
    ``[out, in]`` SVD (SmolLM2's shapes, one thread: 0.03-0.06 s instead of 0.22-0.44 s).
    Directions with ``σ = 0`` (a residual of rank below ``r``) get zero factors.
    """
    r64 = residual.detach().to(torch.float64)
    out_features, in_features = r64.shape
    wide = out_features <= in_features
    vals, vecs = _top_eigenpairs(r64 @ r64.T if wide else r64.T @ r64, rank)
    sigma = vals.clamp_min(0.0).sqrt()
    inv = torch.where(sigma > 0, 1.0 / sigma.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    if wide:
        u, vh = vecs, (vecs.T @ r64) * inv[:, None]
    else:
        u, vh = (r64 @ vecs) * inv[None, :], vecs.T
    root = sigma.sqrt() / (scaling ** 0.5)
    return (root[:, None] * vh).to(torch.float32), (u * root[None, :]).to(torch.float32)


def _top_eigenpairs(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest eigenvalues ``[k]`` (descending) and eigenvectors ``[m, k]`` of symmetric float64 ``gram``."""
    m = gram.shape[0]
    k = min(k, m)
    if gram.device.type == "cpu":
        import scipy.linalg

        vals, vecs = scipy.linalg.eigh(gram.numpy(), subset_by_index=[m - k, m - 1], driver="evr",
                                       overwrite_a=True, check_finite=False)
        vals, vecs = torch.from_numpy(vals), torch.from_numpy(vecs)
    else:
        vals, vecs = torch.linalg.eigh(gram)
        vals, vecs = vals[m - k:], vecs[:, m - k:]
    return vals.flip(0), vecs.flip(1)


class ActivationWhitening:
    """A square-root factor ``S`` (``S Sᵀ = H_λ``) of a damped input Hessian ``H [in, in]`` (symmetric PSD).

    ``damp`` λ is relative to ``mean(diag H)`` (OPTQ's convention), so tiny-energy input directions
    are not amplified without bound when un-whitening.  ``S`` is the Cholesky factor ``L`` of
    ``H_λ = H + λ·mean(diag H)·I`` (lower triangular): any factor with ``S Sᵀ = H_λ`` gives the same
    optimum ``truncSVD_r(R S) S⁻¹`` (for ``S' = S Q``, ``Q`` orthogonal, the ``Q`` cancels), and a
    Cholesky factorization costs ``in³/3`` flops where the symmetric square root's eigendecomposition
    costs an order of magnitude more (measured on a 2-core CPU: 1536², 0.17 s vs 8.2 s).  ``S⁻¹`` is
    never formed: un-whitening is a triangular solve with the ``[r, in]`` factor.
    """

    def __init__(self, hessian: torch.Tensor, damp: float = 0.01, name: str = "weight") -> None:
        h = torch.as_tensor(hessian)
        if h.dim() != 2 or h.shape[0] != h.shape[1]:
            raise ValueError(f"{name}: hessian must be square [in, in], got {tuple(h.shape)}")
        if not bool(torch.isfinite(h).all()):
            raise ValueError(f"{name}: hessian has NaN/Inf (quant.init=calibrated needs finite activations)")
        if not damp > 0:
            raise ValueError(f"{name}: damp must be > 0, got {damp}")
        sym = h.to(torch.float64) + h.to(torch.float64).T  # float64 [in, in]: the one working copy
        sym *= 0.5
        mean_diag = float(sym.diagonal().mean())
        if not mean_diag > 0:
            raise ValueError(f"{name}: hessian is zero (no calibration activations reached the layer)")
        self.shift = damp * mean_diag
        self.h = sym.to(torch.float32)  # what error() multiplies by (fp32 products, float64 sums)
        sym.diagonal().add_(self.shift)
        factor, info = torch.linalg.cholesky_ex(sym)
        del sym
        if int(info) != 0:  # H is PSD, so H_λ is positive definite up to rounding; say so if not
            raise ValueError(f"{name}: the damped hessian is not positive definite (Cholesky failed at column "
                             f"{int(info)}); raise quant.init_damp")
        self.sqrt = factor.to(torch.float32)  # lower triangular; the float64 factor is not kept

    @property
    def inv_sqrt(self) -> torch.Tensor:
        """``S⁻¹`` (fp32), formed on request only (the init itself solves with ``S``)."""
        eye = torch.eye(self.sqrt.shape[0], dtype=torch.float32)
        return torch.linalg.solve_triangular(self.sqrt, eye, upper=False)

    def error(self, diff: torch.Tensor) -> float:
        """``tr(D H Dᵀ)`` (undamped H) of ``D [out, in]``: an fp32 product ``D H``, summed in float64."""
        d = diff.to(torch.float32)
        return float(((d @ self.h).double() * d.double()).sum())

    def low_rank_factors(self, residual: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``A [r, in]``, ``B [out, r]`` with ``s·B A = truncSVD_r(R S) S⁻¹`` (balanced factors)."""
        A, B = low_rank_factors(residual.to(torch.float32) @ self.sqrt, rank, scaling)
        return torch.linalg.solve_triangular(self.sqrt, A, upper=False, left=False), B


def _sse(diff: torch.Tensor) -> float:
    return float(diff.to(torch.float64).pow(2).sum())


def loftq_init(
    weight: torch.Tensor,
    quantize_fn: QuantizeFn,
    rank: int,
    alpha: float,
    iters: int = 1,
    name: str = "weight",
    hessian: torch.Tensor | ActivationWhitening | None = None,
    damp: float = 0.01,
) -> LoftQResult:
    """Quantize ``weight [out, in]`` and initialize LoRA factors on the quantization residual.

    Args:
        weight: the full-precision weight.
        quantize_fn: ``[out, in] fp32 → QuantizedTensor`` (fixed codebooks / bits for LowRA).
        rank: LoRA rank r (1 ≤ r ≤ min(out, in)).
        alpha: LoRA alpha; the scale ``s = alpha / r`` is folded into A and B.
        iters: T ≥ 0 alternations; 0 = plain quantization and the standard LoRA init.
        name: used in error messages (e.g. the layer name).
        hessian: input Hessian ``[in, in]`` for the calibrated init (None: plain LoftQ), or its
            ``ActivationWhitening`` already built (the caller then need not keep the Hessian).
        damp: relative damping of ``hessian`` (see ``ActivationWhitening``).
    """
    check_weight(weight, name)
    if isinstance(iters, bool) or int(iters) != iters or iters < 0:
        raise ValueError(f"loftq iters must be a non-negative integer, got {iters!r}")
    out_features, in_features = weight.shape
    if iters and not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"{name}: LoRA rank must lie in [1, {min(out_features, in_features)}], got {rank}")
    if iters and alpha <= 0:
        raise ValueError(f"{name}: LoRA alpha must be positive, got {alpha}")
    w = weight.detach().to(torch.float32)
    q0 = quantize_fn(w)
    residual = w - q0.dequantize(torch.float32)
    sse_quant = _sse(residual)
    if iters == 0:
        return LoftQResult(q0, None, None, sse_quant, sse_quant)

    scaling = alpha / rank
    whiten = None
    if hessian is not None:
        shape = tuple(hessian.h.shape if isinstance(hessian, ActivationWhitening) else hessian.shape)
        if shape != (in_features, in_features):
            raise ValueError(f"{name}: hessian must be [{in_features}, {in_features}], got {shape}")
        whiten = hessian if isinstance(hessian, ActivationWhitening) else ActivationWhitening(hessian, damp, name)
    best: LoftQResult | None = None
    history = []
    q = q0
    delta = None  # s · B @ A of the previous iterate
    for t in range(1, int(iters) + 1):
        if delta is not None:
            q = quantize_fn(w - delta)
            residual = w - q.dequantize(torch.float32)
        if whiten is None:
            A, B = low_rank_factors(residual, rank, scaling)
        else:
            A, B = whiten.low_rank_factors(residual, rank, scaling)
        delta = scaling * (B @ A)
        sse = _sse(residual - delta)
        act = None if whiten is None else whiten.error(residual - delta)
        score = sse if act is None else act
        history.append(score)
        if best is None or score < (best.sse if best.act_error is None else best.act_error):
            best = LoftQResult(q, A, B, sse_quant, sse, best_iter=t, act_error=act)
    best.history = history
    return best
