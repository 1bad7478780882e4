"""``torch.ops.lowra.lut_linear``: the quantized LoRA linear as PyTorch custom ops.

``y = x · deq(W)ᵀ + bias + s · (x Aᵀ) Bᵀ`` with ``x [..., in]``, a frozen quantized ``W [out, in]``
given as tensors and ints (``lowra_kernels.weight.PackedWeight.op_args``: ``weight = [codes…, rows…,
codebooks…, absmax]``, one packed-code, row-index and codebook tensor per stored bit-width, and
``meta = [group_size, in_features, bits…]``),
LoRA adapters ``A [r, in]``, ``B [out, r]`` and LoRA scale ``s`` (optional), and an optional
``bias [out]``. Output in ``x.dtype``.

Four ops (``torch.library.custom_op``, namespace ``lowra``), each with a fake (meta)
implementation, so ``torch.compile(fullgraph=True)``, ``torch.export`` and CUDA graphs capture them
as single nodes:

* ``lowra::lut_linear`` — the forward above. Autograd (``register_autograd``): gradients for
  ``x``, ``A``, ``B``, a bias that requires grad, and the codebooks / absmax when they require grad
  (trainable codebooks and scales: ``lowra_kernels.codebook_grad.layer_table_grads``, chunked, never
  ``∂L/∂W`` whole; on CPU one fused extension pass per width and chunk);
  the integer codes and row indices get none.
  Only ``x`` and the adapters are saved; ``deq(W)`` is never kept between forward and backward.
* ``lowra::lut_grad_input`` — ``grad_y · deq(W)`` (the base's part of ``grad_x``; its own
  backward is ``lut_linear`` without adapters, so double backward works).
* ``lowra::dequantize`` — ``deq(W) [out, in]`` in a given dtype.
* ``lowra::table_grads`` — the codebook / absmax gradients of ``lut_linear``'s backward (trainable
  tables only; eager backward calls its implementation directly, traced backward the op).

Backends (``lowra_kernels.dispatch.resolve``): ``"auto"`` runs the Triton kernels on CUDA, the C++
extension on CPU (for fp32 ``x`` with ≤ 16 rows the whole layer — GEMV, adapters, bias — is one
extension call), the PyTorch references elsewhere; ``"torch"``, ``"cpu"``, ``"triton"`` force one.
``lut_linear_ref`` is the reference of the forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowra_kernels.cpu_backend import GEMV_MAX_M as CPU_GEMV_MAX_M
from lowra_kernels.cpu_backend import dequantize_weight_cpu, lut_lora_gemv_cpu
from lowra_kernels.cpu_backend import when_ready as _cpu_when_ready
from lowra_kernels.dispatch import resolve
from lowra_kernels.lut_matmul import lut_matmul, lut_matmul_backward, lut_matmul_ref
from lowra_kernels.weight import PackedWeight

__all__ = ["dequantize_op", "lut_grad_input", "lut_linear", "lut_linear_autograd", "lut_linear_forward",
           "lut_linear_ref", "lut_linear_unchecked"]


def _has_adapter(lora_A: torch.Tensor | None, lora_B: torch.Tensor | None) -> bool:
    """Whether an adapter is present; both or neither of ``A [r, in]`` / ``B [out, r]`` must be given."""
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must be given together (or both None)")
    return lora_A is not None


def _check_args(x: torch.Tensor, w: PackedWeight, lora_A, lora_B, bias) -> None:
    """Shape checks of the forward's arguments (a ``ValueError`` names the argument)."""
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {w.in_features}")
    if _has_adapter(lora_A, lora_B):
        r = lora_A.shape[0]
        if lora_A.shape != (r, w.in_features) or lora_B.shape != (w.out_features, r):
            raise ValueError(f"adapters must be A [r, {w.in_features}] and B [{w.out_features}, r], got "
                             f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    if bias is not None and bias.shape != (w.out_features,):
        raise ValueError(f"bias must be [{w.out_features}], got {tuple(bias.shape)}")


def _add_epilogue(y: torch.Tensor, x: torch.Tensor, lora_A, lora_B, bias, scaling: float) -> torch.Tensor:
    """``y += bias + s · (x Aᵀ) Bᵀ`` (in place on the fresh, contiguous ``y``), the adapter product in ``A``'s
    dtype. When ``x``, ``y`` and the adapters share a dtype the up-projection and the scale are one
    ``addmm_`` into ``y`` (two ATen calls for the adapters instead of five: host time per call)."""
    if bias is not None:
        y += bias.to(y.dtype)
    if lora_A is not None:
        if x.dtype == y.dtype == lora_A.dtype == lora_B.dtype:
            y.view(-1, y.shape[-1]).addmm_(F.linear(x.reshape(-1, x.shape[-1]), lora_A), lora_B.t(), alpha=scaling)
        else:
            y += (F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B) * scaling).to(y.dtype)
    return y


def lut_linear_ref(x: torch.Tensor, w: PackedWeight, lora_A: torch.Tensor | None = None,
                   lora_B: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   scaling: float = 1.0) -> torch.Tensor:
    """Reference forward: ``x deq(W)ᵀ`` by the PyTorch reference, then bias and adapters as above."""
    _check_args(x, w, lora_A, lora_B, bias)
    return _add_epilogue(lut_matmul_ref(x, w), x, lora_A, lora_B, bias, scaling)


def lut_linear_forward(x: torch.Tensor, w: PackedWeight, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
                       bias: torch.Tensor | None, scaling: float, backend: str) -> torch.Tensor:
    """The forward of ``lowra::lut_linear`` — the function its registered kernel runs — callable without
    the dispatcher (``LowRALinear`` does so in eager mode: the op's dispatch costs more host time than the
    whole decode-step implementation). Checks the arguments, then ``lut_linear_unchecked``. No autograd."""
    _check_args(x, w, lora_A, lora_B, bias)
    return lut_linear_unchecked(x, w, lora_A, lora_B, bias, scaling, backend)


def lut_linear_unchecked(x: torch.Tensor, w: PackedWeight, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
                         bias: torch.Tensor | None, scaling: float, backend: str) -> torch.Tensor:
    """``lut_linear_forward`` without the shape checks, for callers whose shapes are fixed at construction
    (``LowRALinear``: only ``x``'s last dimension can vary, and it checks that). The per-call host path."""
    kind = resolve(backend, x)
    if (kind == "cpu" and x.dtype == torch.float32 and 0 < x.numel() <= CPU_GEMV_MAX_M * w.in_features
            and (lora_A is None or (lora_A.dtype == torch.float32 and lora_A.is_contiguous()
                                    and lora_B.dtype == torch.float32 and lora_B.is_contiguous()))
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))):
        return lut_lora_gemv_cpu(x, w, lora_A, lora_B, scaling, bias, check=False)  # one extension pass per layer
    if kind == "cpu" and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and (
            bias is None or bias.dtype == x.dtype):
        # deq(W) as a transient in x's dtype (lut_matmul_cpu's path), the bias folded into the GEMM
        y = F.linear(x, dequantize_weight_cpu(w, x.dtype), bias)
        return _add_epilogue(y, x, lora_A, lora_B, None, scaling)
    return _add_epilogue(lut_matmul(x, w, kind), x, lora_A, lora_B, bias, scaling)


@torch.library.custom_op("lowra::lut_linear", mutates_args=())
def lut_linear(
    x: torch.Tensor, weight: list[torch.Tensor], lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
    bias: torch.Tensor | None, meta: list[int], scaling: float, backend: str,
) -> torch.Tensor:
    """``x deq(W)ᵀ + bias + s (x Aᵀ) Bᵀ`` (module doc); ``x [..., in]`` → ``[..., out]`` in ``x.dtype``.

    ``weight = [codes…, rows…, codebooks…, absmax]`` and ``meta = [group_size, in_features, bits…]``
    (``PackedWeight.op_args``).
    """
    w = PackedWeight.from_op_args(weight, meta)
    return lut_linear_forward(x, w, lora_A, lora_B, bias, scaling, backend)


@lut_linear.register_fake
def _lut_linear_fake(x, weight, lora_A, lora_B, bias, meta, scaling, backend):
    if x.shape[-1] != meta[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {meta[1]}")
    return x.new_empty((*x.shape[:-1], weight[-1].shape[0]))


@torch.library.custom_op("lowra::lut_grad_input", mutates_args=())
def lut_grad_input(grad_y: torch.Tensor, weight: list[torch.Tensor], meta: list[int], backend: str) -> torch.Tensor:
    """``grad_y [..., out] · deq(W) → [..., in]`` in ``grad_y.dtype`` (the base's part of ``grad_x``)."""
    return _lut_grad_input_cpu(grad_y, weight, meta, backend)


def _lut_grad_input_cpu(grad_y: torch.Tensor, weight: list[torch.Tensor], meta: list[int],
                        backend: str) -> torch.Tensor:
    """``lowra::lut_grad_input``'s implementation (also its CPU kernel, registered below)."""
    w = PackedWeight.from_op_args(weight, meta)
    if grad_y.shape[-1] != w.out_features:
        raise ValueError(f"grad_y has {grad_y.shape[-1]} features, the weight has {w.out_features} rows")
    return lut_matmul_backward(grad_y, w, resolve(backend, grad_y))


@lut_grad_input.register_fake
def _lut_grad_input_fake(grad_y, weight, meta, backend):
    return grad_y.new_empty((*grad_y.shape[:-1], meta[1]))


@torch.library.custom_op("lowra::dequantize", mutates_args=())
def dequantize_op(weight: list[torch.Tensor], meta: list[int], dtype: torch.dtype, backend: str) -> torch.Tensor:
    """``deq(W) [out, in]`` in ``dtype`` (fp32 product rounded once: bit-exact across backends)."""
    from lowra_kernels.dequantize import dequantize_weight

    w = PackedWeight.from_op_args(weight, meta)
    return dequantize_weight(w, dtype, resolve(backend, w.absmax))


@dequantize_op.register_fake
def _dequantize_fake(weight, meta, dtype, backend):
    return weight[-1].new_empty((weight[-1].shape[0], meta[1]), dtype=dtype)


# ------------------------------------------------------------------------------------ autograd
def _keeps_output(weight: list[torch.Tensor], meta: list[int], output: torch.Tensor, backend: str) -> bool:
    """Whether the backward wants the forward's output: trainable codebooks of 1-bit rows (frozen scales,
    fp32/fp64 output, not the reference backend) take ``one_bit_codebook_grad``, which needs the base
    output ``x deq(W)ᵀ`` (recovered from the output: minus bias and adapters)."""
    n = len(meta) - 2
    return (backend != "torch" and output.dtype in (torch.float32, torch.float64) and not weight[3 * n].requires_grad
            and any(weight[2 * n + j].requires_grad and meta[2 + j] == 1 for j in range(n)))


def _setup_lut_linear(ctx, inputs, output) -> None:
    x, weight, lora_A, lora_B, bias, meta, scaling, backend = inputs
    ctx.meta, ctx.scaling, ctx.backend, ctx.has_bias = meta, scaling, backend, bias is not None
    y = output if _keeps_output(weight, meta, output, backend) else None
    # the stored tensors themselves, never deq(W); the output only for the 1-bit codebook gradient
    ctx.save_for_backward(x, lora_A, lora_B, bias if y is not None else None, y, *weight)


def _base_grads(grad_y: torch.Tensor, x: torch.Tensor, weight: list[torch.Tensor], meta: list[int],
                need: list[bool], backend: str, kept: tuple | None = None) -> list[torch.Tensor | None]:
    """Gradients of the weight's tensors ``[codes…, rows…, codebooks…, absmax]``: the codebooks and the
    absmax that require grad get ``lowra_kernels.codebook_grad`` (a segment sum per row, ``∂L/∂W`` never
    built for the whole layer), the integer codes and row indices ``None``. Returned in fp32 (autograd
    casts them to the tensors' dtypes)."""
    n = len(meta) - 2
    grads: list[torch.Tensor | None] = [None] * len(weight)
    need_cb, need_a = [bool(v) for v in need[2 * n:3 * n]], bool(need[3 * n])
    if not (any(need_cb) or need_a):
        return grads
    go, xx = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1])
    y, bias, lora_B, gtu = kept if kept is not None else (None, None, None, None)
    args = (go, xx, weight, meta, need_cb, need_a, backend, None if y is None else y.reshape(-1, y.shape[-1]), bias,
            lora_B, gtu)
    # eager (plain tensors): the op's implementation without the dispatcher's host time (~0.1 ms a layer);
    # traced (fake / functional tensors under torch.compile): the opaque op
    eager = type(go) is torch.Tensor and type(xx) is torch.Tensor and not torch.compiler.is_compiling()
    out = _table_grads_impl(*args) if eager else table_grads(*args)
    for j in range(n):
        if need_cb[j]:
            grads[2 * n + j] = out[j]
    if need_a:
        grads[3 * n] = out[n]
    return grads


def _input_and_adapter_grads(grad_y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor | None,
                             lora_B: torch.Tensor | None, weight: list[torch.Tensor], meta: list[int], scaling: float,
                             backend: str, need_x: bool, need_a: bool, need_b: bool, need_bias: bool,
                             w: PackedWeight | None = None) -> tuple:
    """``(grad_x, grad_A, grad_B, grad_bias)`` of ``lut_linear`` (``None`` where not needed).

    The base's part of ``grad_x`` is the ``lowra::lut_grad_input`` op, or — given the ``PackedWeight``
    ``w`` while no graph is being recorded (no double backward) — its implementation called directly: the
    same function, so both give identical numbers. The rest is the same ATen calls in every caller (the
    op's registered backward, traced by AOT autograd under ``torch.compile``, and the eager path
    ``lut_linear_autograd``), in the same order, so eager and compiled training run the same reductions."""
    grad_x = grad_a = grad_b = grad_bias = None
    if need_x:
        if w is not None and not torch.is_grad_enabled():
            grad_x = lut_matmul_backward(grad_y, w, resolve(backend, grad_y))
        else:
            grad_x = lut_grad_input(grad_y, weight, meta, backend)
    if lora_A is not None and (need_x or need_a or need_b):
        g = grad_y.to(lora_A.dtype) * scaling  # [..., out]
        gu = g @ lora_B  # [..., r]: gradient of u = x Aᵀ
        xa = x.to(lora_A.dtype)
        if need_x:
            grad_x = grad_x + (gu @ lora_A).to(x.dtype)
        if need_a:
            grad_a = gu.reshape(-1, gu.shape[-1]).t() @ xa.reshape(-1, xa.shape[-1])
        if need_b:
            u = F.linear(xa, lora_A)
            grad_b = g.reshape(-1, g.shape[-1]).t() @ u.reshape(-1, u.shape[-1])
    if need_bias:
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return grad_x, grad_a, grad_b, grad_bias


def _table_grads_impl(grad_out: torch.Tensor, x: torch.Tensor, weight: list[torch.Tensor], meta: list[int],
                      need_cb: list[bool], need_a: bool, backend: str, y: torch.Tensor | None,
                      bias: torch.Tensor | None, lora_B: torch.Tensor | None,
                      grad_B: torch.Tensor | None) -> list[torch.Tensor]:
    """``[∂L/∂codebook_j for each width j…, ∂L/∂absmax]`` from ``grad_out [M, out]`` and ``x [M, in]``
    (``lowra_kernels.codebook_grad.layer_table_grads``): fp32 (the codebooks' float64 for float64 ``x``);
    a width whose gradient is not wanted gets zeros, ``∂L/∂absmax`` is ``[0]`` when not wanted.
    ``y [M, out]``, the forward's output when it kept it, with its ``bias``, ``lora_B`` and the adapters'
    ``grad_B`` (``s · grad_outᵀ (x Aᵀ)``), gives ``base_dot[r] = Σ_m grad_out[m, r] · (x deq(W)ᵀ)[m, r]``
    (the output's row dot less the bias' and the adapters'), which lets 1-bit rows skip ``∂L/∂W``.
    ``lowra::table_grads`` wraps it as an opaque op, so ``torch.compile`` traces the backward without
    entering the CPU extension's raw pointers or the Triton launch; eager mode calls it directly."""
    from lowra_kernels.codebook_grad import layer_table_grads, output_row_dot

    n = len(meta) - 2
    base_dot = None
    if y is not None:
        base_dot = output_row_dot(grad_out, y)  # float64 [out]: the corrections cancel against it
        if bias is not None:
            base_dot -= bias.to(torch.float64) * grad_out.sum(0).to(torch.float64)
        if lora_B is not None:  # Σ_m s g[m, r] (u Bᵀ)[m, r] = Σ_j B[r, j] grad_B[r, j]
            base_dot -= (grad_B.to(torch.float64) * lora_B.to(torch.float64)).sum(1)
    g_cbs, g_a = layer_table_grads(grad_out, x, weight[:n], weight[n:2 * n], weight[2 * n:3 * n], weight[3 * n],
                                   list(meta[2:]), meta[0], list(need_cb), need_a, backend, base_dot)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = [g.to(acc) if g is not None else torch.zeros(weight[2 * n + j].shape, dtype=acc, device=x.device)
           for j, g in enumerate(g_cbs)]
    out.append(g_a.float() if g_a is not None else torch.zeros(0, dtype=torch.float32, device=x.device))
    return out


table_grads = torch.library.custom_op("lowra::table_grads", _table_grads_impl, mutates_args=())


@table_grads.register_fake
def _table_grads_fake(grad_out, x, weight, meta, need_cb, need_a, backend, y, bias, lora_B, grad_B):
    n = len(meta) - 2
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = [x.new_empty(weight[2 * n + j].shape, dtype=acc) for j in range(n)]
    out.append(x.new_empty(weight[3 * n].shape if need_a else (0,), dtype=torch.float32))
    return out


def _backward_lut_linear(ctx, grad_y: torch.Tensor):
    """Gradients of ``x``, ``A``, ``B``, ``bias`` and of the base's codebooks / absmax where they require
    grad (trainable codebooks and scales, ``_base_grads``); ``None`` for the codes and row indices."""
    x, lora_A, lora_B, bias, y, *weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x, grad_a, grad_b, grad_bias = _input_and_adapter_grads(
        grad_y, x, lora_A, lora_B, weight, ctx.meta, ctx.scaling, ctx.backend, need[0], need[2], need[3],
        ctx.has_bias and need[4])
    gtu = None
    if y is not None and lora_A is not None:  # gᵀ u = grad_B: the adapters' part of the output's row dot
        gtu = grad_b
        if gtu is None:
            u = F.linear(x.to(lora_A.dtype), lora_A).reshape(-1, lora_A.shape[0])
            gtu = (grad_y.reshape(-1, grad_y.shape[-1]).to(lora_A.dtype) * ctx.scaling).t() @ u
    kept = None if y is None else (y, bias, lora_B if lora_A is not None else None, gtu)
    grad_w = _base_grads(grad_y, x, weight, ctx.meta, list(need[1]), ctx.backend, kept)
    return grad_x, grad_w, grad_a, grad_b, grad_bias, None, None, None


lut_linear.register_autograd(_backward_lut_linear, setup_context=_setup_lut_linear)


def _setup_grad_input(ctx, inputs, output) -> None:
    grad_y, weight, meta, backend = inputs
    ctx.meta, ctx.backend = meta, backend
    ctx.save_for_backward(*weight)


def _backward_grad_input(ctx, gg: torch.Tensor):
    """``lut_grad_input`` is linear in ``grad_y``: its backward is the forward matmul (no adapters)."""
    weight = list(ctx.saved_tensors)
    ggy = lut_linear(gg, weight, None, None, None, ctx.meta, 1.0, ctx.backend)
    return ggy, [None] * len(weight), None, None


lut_grad_input.register_autograd(_backward_grad_input, setup_context=_setup_grad_input)


# ------------------------------------------------------------------------------------ CPU kernels
# The ops' CPU kernels registered directly with the dispatcher: a call from a compiled graph (inductor calls
# ``torch.ops.lowra.lut_linear.default`` once per layer and token) then runs without ``torch.library.custom_op``'s
# per-call wrapper (dynamo-disable frame, output-alias checks). A CPU kernel takes precedence over the op's
# CompositeExplicitAutograd kernel for CPU tensors only; every other device keeps the op's own path.
#
# ``lut_linear``'s CPU kernel is C++ (``kernels/cpu_backend.cpp``, ``lut_linear_cpu_kernel``), registered when the
# extension loads: the decode case (fp32 x with ≤ 16 rows, fp32 adapters and bias) runs the same extension
# functions as the eager path (``lut_lora_gemv_cpu``: same bits) with no Python in the call; every other call goes
# to ``lowra::lut_linear_cpu_fallback``, this Python implementation. Until the extension has loaded (or where it
# cannot build) the op's own CompositeExplicitAutograd kernel serves CPU tensors: same function.
_CPU_LIB = torch.library.Library("lowra", "FRAGMENT")
_CPU_LIB.define("lut_linear_cpu_fallback(Tensor x, Tensor[] weight, Tensor? lora_A, Tensor? lora_B, Tensor? bias, "
                "SymInt[] meta, float scaling, str backend) -> Tensor")


def _lut_linear_cpu(x, weight, lora_A, lora_B, bias, meta, scaling, backend):
    return lut_linear_forward(x, PackedWeight.from_op_args(weight, meta), lora_A, lora_B, bias, scaling, backend)


_CPU_LIB.impl("lut_linear_cpu_fallback", _lut_linear_cpu, "CPU")
_CPU_LIB.impl("lut_grad_input", _lut_grad_input_cpu, "CPU")


def _install_cpp_kernel(ext) -> None:
    """``lowra::lut_linear``'s C++ CPU kernel (its GEMV grain: ``cpu_backend.GEMV_GRAIN`` at registration)."""
    from lowra_kernels import cpu_backend

    ext.register_lut_linear_cpu(cpu_backend.GEMV_GRAIN)


_cpu_when_ready(_install_cpp_kernel)


# ------------------------------------------------------------------------------------ eager autograd
class _EagerLutLinear(torch.autograd.Function):
    """``lowra::lut_linear`` with autograd for eager calls that record a graph (``lut_linear_autograd``).

    The op's own autograd goes through the dispatcher twice and ``torch.library``'s Python wrapper
    (argument flattening, ``fill_defaults``, a generated ``autograd.Function``): 4-6x the host time of
    ``F.linear`` + LoRA per training-forward call. This Function runs the same forward implementation
    (``lut_linear_unchecked``) and the same backward (``_input_and_adapter_grads``), so eager numbers equal
    the op's (and compiled training, which traces the op's registered backward). The frozen weight's
    tensors are held as attributes, not saved tensors: they never change and need no version check."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, w, weight, meta, scaling, backend):
        ctx.w, ctx.weight, ctx.meta, ctx.scaling, ctx.backend = w, weight, meta, scaling, backend
        ctx.save_for_backward(x, lora_A, lora_B)
        return lut_linear_unchecked(x, w, lora_A, lora_B, bias, scaling, backend)

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_A, lora_B = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = _input_and_adapter_grads(grad_y, x, lora_A, lora_B, ctx.weight, ctx.meta, ctx.scaling, ctx.backend,
                                         need[0], need[1], need[2], need[3], ctx.w)
        return (*grads, None, None, None, None, None)


def lut_linear_autograd(x: torch.Tensor, w: PackedWeight, weight: list[torch.Tensor], meta: list[int],
                        lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, bias: torch.Tensor | None,
                        scaling: float, backend: str) -> torch.Tensor:
    """``torch.ops.lowra.lut_linear(x, weight, lora_A, lora_B, bias, meta, scaling, backend)`` for an eager
    call that records autograd, at a fraction of the op's host time (``_EagerLutLinear``); ``w`` is
    ``PackedWeight.from_op_args(weight, meta)``, built once by the caller. Gradients flow to ``x``, the
    adapters and a bias that requires grad; the weight's tensors must not require grad (trainable
    codebooks / scales go through the op). Same numbers as the op, forward and backward; unchecked shapes
    (``lut_linear_unchecked``). Under ``torch.compile`` call the op (this is not traceable)."""
    return _EagerLutLinear.apply(x, lora_A, lora_B, bias, w, weight, meta, scaling, backend)
