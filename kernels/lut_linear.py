"""``torch.ops.lowra.lut_linear``: the quantized LoRA linear as PyTorch custom ops.

``y = x · deq(W)ᵀ + bias + s · (x Aᵀ) Bᵀ`` with ``x [..., in]``, a frozen quantized ``W [out, in]``
given as tensors (``lowra_kernels.weight.PackedWeight``, flattened: packed codes, row index and
codebook per stored bit-width, the group absmax, the widths, group size and ``in_features``),
LoRA adapters ``A [r, in]``, ``B [out, r]`` and LoRA scale ``s`` (optional), and an optional
``bias [out]``. Output in ``x.dtype``.

Three ops (``torch.library.custom_op``, namespace ``lowra``), each with a fake (meta)
implementation, so ``torch.compile(fullgraph=True)``, ``torch.export`` and CUDA graphs capture them
as single nodes:

* ``lowra::lut_linear`` — the forward above. Autograd (``register_autograd``): gradients for
  ``x``, ``A``, ``B`` and a bias that requires grad; the quantized base gets none (codebooks are
  a tensor input whose gradient is ``None`` today, the slot a trainable-codebook backward fills).
  Only ``x`` and the adapters are saved; ``deq(W)`` is never kept between forward and backward.
* ``lowra::lut_grad_input`` — ``grad_y · deq(W)`` (the base's part of ``grad_x``; its own
  backward is ``lut_linear`` without adapters, so double backward works).
* ``lowra::dequantize`` — ``deq(W) [out, in]`` in a given dtype.

Backends (``lowra_kernels.dispatch.resolve``): ``"auto"`` runs the Triton kernels on CUDA, the C++
extension on CPU (for fp32 ``x`` with ≤ 16 rows the whole layer — GEMV, adapters, bias — is one
extension call), the PyTorch references elsewhere; ``"torch"``, ``"cpu"``, ``"triton"`` force one.
``lut_linear_ref`` is the reference of the forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowra_kernels.dispatch import resolve
from lowra_kernels.lut_matmul import lut_matmul, lut_matmul_backward, lut_matmul_ref
from lowra_kernels.weight import PackedWeight

__all__ = ["dequantize_op", "lut_grad_input", "lut_linear", "lut_linear_ref"]


def _adapter_ok(x: torch.Tensor, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None) -> bool:
    """Whether an adapter is present; both or neither of ``A [r, in]`` / ``B [out, r]`` must be given."""
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must be given together (or both None)")
    return lora_A is not None


def _check_args(x: torch.Tensor, w: PackedWeight, lora_A, lora_B, bias) -> None:
    """Shape checks of the forward's arguments (a ``ValueError`` names the argument)."""
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {w.in_features}")
    if _adapter_ok(x, lora_A, lora_B):
        r = lora_A.shape[0]
        if lora_A.shape != (r, w.in_features) or lora_B.shape != (w.out_features, r):
            raise ValueError(f"adapters must be A [r, {w.in_features}] and B [{w.out_features}, r], got "
                             f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    if bias is not None and bias.shape != (w.out_features,):
        raise ValueError(f"bias must be [{w.out_features}], got {tuple(bias.shape)}")


def _add_epilogue(y: torch.Tensor, x: torch.Tensor, lora_A, lora_B, bias, scaling: float) -> torch.Tensor:
    """``y += bias + s · (x Aᵀ) Bᵀ`` (in place on the fresh ``y``), the adapter product in ``A``'s dtype."""
    if bias is not None:
        y += bias.to(y.dtype)
    if lora_A is not None:
        y += (F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B) * scaling).to(y.dtype)
    return y


def lut_linear_ref(x: torch.Tensor, w: PackedWeight, lora_A: torch.Tensor | None = None,
                   lora_B: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   scaling: float = 1.0) -> torch.Tensor:
    """Reference forward: ``x deq(W)ᵀ`` by the PyTorch reference, then bias and adapters as above."""
    _check_args(x, w, lora_A, lora_B, bias)
    return _add_epilogue(lut_matmul_ref(x, w), x, lora_A, lora_B, bias, scaling)


def _cpu_fused(x: torch.Tensor, lora_A, lora_B, bias) -> bool:
    """fp32 decode-sized call whose adapters/bias the extension's one-call GEMV takes."""
    from lowra_kernels.cpu_backend import GEMV_MAX_M

    if x.dtype != torch.float32 or not 0 < x.numel() <= GEMV_MAX_M * x.shape[-1]:
        return False
    return all(t is None or (t.dtype == torch.float32 and t.is_contiguous()) for t in (lora_A, lora_B, bias))


def _forward(x: torch.Tensor, w: PackedWeight, lora_A, lora_B, bias, scaling: float, backend: str) -> torch.Tensor:
    kind = resolve(backend, x)
    if kind == "cpu" and _cpu_fused(x, lora_A, lora_B, bias):
        from lowra_kernels.cpu_backend import lut_lora_gemv_cpu

        return lut_lora_gemv_cpu(x, w, lora_A, lora_B, scaling, bias)
    return _add_epilogue(lut_matmul(x, w, kind), x, lora_A, lora_B, bias, scaling)


@torch.library.custom_op("lowra::lut_linear", mutates_args=())
def lut_linear(
    x: torch.Tensor, codes: list[torch.Tensor], rows: list[torch.Tensor], codebooks: list[torch.Tensor],
    absmax: torch.Tensor, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, bias: torch.Tensor | None,
    bits: list[int], group_size: int, in_features: int, scaling: float, backend: str,
) -> torch.Tensor:
    """``x deq(W)ᵀ + bias + s (x Aᵀ) Bᵀ`` (module doc); ``x [..., in]`` → ``[..., out]`` in ``x.dtype``."""
    w = PackedWeight(tuple(codes), tuple(rows), tuple(codebooks), absmax, tuple(bits), group_size, in_features)
    _check_args(x, w, lora_A, lora_B, bias)
    return _forward(x, w, lora_A, lora_B, bias, scaling, backend)


@lut_linear.register_fake
def _lut_linear_fake(x, codes, rows, codebooks, absmax, lora_A, lora_B, bias, bits, group_size, in_features,
                     scaling, backend):
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    return x.new_empty((*x.shape[:-1], absmax.shape[0]))


@torch.library.custom_op("lowra::lut_grad_input", mutates_args=())
def lut_grad_input(
    grad_y: torch.Tensor, codes: list[torch.Tensor], rows: list[torch.Tensor], codebooks: list[torch.Tensor],
    absmax: torch.Tensor, bits: list[int], group_size: int, in_features: int, backend: str,
) -> torch.Tensor:
    """``grad_y [..., out] · deq(W) → [..., in]`` in ``grad_y.dtype`` (the base's part of ``grad_x``)."""
    w = PackedWeight(tuple(codes), tuple(rows), tuple(codebooks), absmax, tuple(bits), group_size, in_features)
    if grad_y.shape[-1] != w.out_features:
        raise ValueError(f"grad_y has {grad_y.shape[-1]} features, the weight has {w.out_features} rows")
    return lut_matmul_backward(grad_y, w, resolve(backend, grad_y))


@lut_grad_input.register_fake
def _lut_grad_input_fake(grad_y, codes, rows, codebooks, absmax, bits, group_size, in_features, backend):
    return grad_y.new_empty((*grad_y.shape[:-1], in_features))


@torch.library.custom_op("lowra::dequantize", mutates_args=())
def dequantize_op(
    codes: list[torch.Tensor], rows: list[torch.Tensor], codebooks: list[torch.Tensor], absmax: torch.Tensor,
    bits: list[int], group_size: int, in_features: int, dtype: torch.dtype, backend: str,
) -> torch.Tensor:
    """``deq(W) [out, in]`` in ``dtype`` (fp32 product rounded once: bit-exact across backends)."""
    from lowra_kernels.dequantize import dequantize_weight

    w = PackedWeight(tuple(codes), tuple(rows), tuple(codebooks), absmax, tuple(bits), group_size, in_features)
    return dequantize_weight(w, dtype, resolve(backend, absmax))


@dequantize_op.register_fake
def _dequantize_fake(codes, rows, codebooks, absmax, bits, group_size, in_features, dtype, backend):
    return absmax.new_empty((absmax.shape[0], in_features), dtype=dtype)


# ------------------------------------------------------------------------------------ autograd
def _save_weight(ctx, codes, rows, codebooks, absmax, bits, group_size, in_features, *extra) -> None:
    """Save the packed weight's tensors (stored tensors, never a copy) and its ints on ``ctx``."""
    ctx.n_groups = len(codes)
    ctx.meta = (list(bits), group_size, in_features)
    ctx.save_for_backward(*extra, absmax, *codes, *rows, *codebooks)


def _saved_weight(ctx, n_extra: int) -> tuple[list, tuple]:
    """``(extra tensors, (codes, rows, codebooks, absmax, bits, group_size, in_features))`` (``_save_weight``)."""
    saved = list(ctx.saved_tensors)
    extra, absmax, rest = saved[:n_extra], saved[n_extra], saved[n_extra + 1:]
    n = ctx.n_groups
    return extra, (rest[:n], rest[n:2 * n], rest[2 * n:], absmax, *ctx.meta)


def _setup_lut_linear(ctx, inputs, output) -> None:
    x, codes, rows, codebooks, absmax, lora_A, lora_B, bias, bits, group_size, in_features, scaling, backend = inputs
    ctx.scaling, ctx.backend = scaling, backend
    ctx.has_bias = bias is not None
    _save_weight(ctx, codes, rows, codebooks, absmax, bits, group_size, in_features, x, lora_A, lora_B)


def _backward_lut_linear(ctx, grad_y: torch.Tensor):
    """Gradients of ``x``, ``A``, ``B`` and ``bias``; ``None`` for the frozen base (codebooks included)."""
    (x, lora_A, lora_B), (codes, rows, codebooks, absmax, bits, group_size, in_features) = _saved_weight(ctx, 3)
    need = ctx.needs_input_grad
    grad_x = grad_a = grad_b = grad_bias = None
    if need[0]:
        grad_x = lut_grad_input(grad_y, codes, rows, codebooks, absmax, bits, group_size, in_features,
                                ctx.backend)
    if lora_A is not None and (need[0] or need[5] or need[6]):
        g = grad_y.to(lora_A.dtype) * ctx.scaling  # [..., out]
        gu = g @ lora_B  # [..., r]: gradient of u = x Aᵀ
        xa = x.to(lora_A.dtype)
        if need[0]:
            grad_x = grad_x + (gu @ lora_A).to(x.dtype)
        if need[5]:
            grad_a = gu.reshape(-1, gu.shape[-1]).t() @ xa.reshape(-1, xa.shape[-1])
        if need[6]:
            u = F.linear(xa, lora_A)
            grad_b = g.reshape(-1, g.shape[-1]).t() @ u.reshape(-1, u.shape[-1])
    if ctx.has_bias and need[7]:
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    none = [None] * ctx.n_groups  # codes, rows, codebooks: no gradient (frozen base; see module doc)
    return grad_x, none, none, list(none), None, grad_a, grad_b, grad_bias, None, None, None, None, None


lut_linear.register_autograd(_backward_lut_linear, setup_context=_setup_lut_linear)


def _setup_grad_input(ctx, inputs, output) -> None:
    grad_y, codes, rows, codebooks, absmax, bits, group_size, in_features, backend = inputs
    ctx.backend = backend
    _save_weight(ctx, codes, rows, codebooks, absmax, bits, group_size, in_features)


def _backward_grad_input(ctx, gg: torch.Tensor):
    """``lut_grad_input`` is linear in ``grad_y``: its backward is the forward matmul (no adapters)."""
    _, (codes, rows, codebooks, absmax, bits, group_size, in_features) = _saved_weight(ctx, 0)
    ggy = lut_linear(gg, codes, rows, codebooks, absmax, None, None, None, bits, group_size, in_features, 1.0,
                     ctx.backend)
    none = [None] * ctx.n_groups
    return ggy, none, none, none, None, None, None, None, None


lut_grad_input.register_autograd(_backward_grad_input, setup_context=_setup_grad_input)


def op_args(w: PackedWeight) -> tuple:
    """``(codes, rows, codebooks, absmax)`` lists as the ops take them, and ``(bits, group_size, in_features)``."""
    return (list(w.codes), list(w.rows), list(w.codebooks), w.absmax), (list(w.bits), w.group_size, w.in_features)
