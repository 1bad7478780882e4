"""``LowRALinear``: a frozen (quantized or dense) base weight plus trainable LoRA adapters.

``y = base(x) + bias + s · dropout(x) @ Aᵀ @ Bᵀ`` with ``A [r, in]``, ``B [out, r]`` and the LoRA
scale ``s = alpha / r`` (PEFT's ``lora_A.weight`` / ``lora_B.weight`` convention, so adapters
export to PEFT without transposes).

The base is either a ``QuantizedTensor`` (1–4 bits per output row) or a frozen dense weight (the
plain-LoRA baseline, ``method="none"``). Its matmul runs through ``QuantizedMatmul``, a custom
autograd Function: forward runs ``lowra_kernels.lut_matmul`` (on CUDA the fused Triton LUT matmul that
dequantizes tiles in registers; on CPU the C++ backend ``lowra_kernels.cpu_backend``: a fused GEMV for
M ≤ 16, a transient dequantized weight + BLAS above), backward runs
its transposed counterpart and returns only the gradient w.r.t. the input. No gradient, optimizer state or
persistent copy of the base weight ever exists, so memory is codes + adapters + activations.
This also makes the module correct under gradient checkpointing (forward is simply recomputed) and
under ``torch.no_grad`` (nothing is saved).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowra.format import QuantizedTensor

__all__ = ["LowRALinear", "QuantizedMatmul", "base_weight", "default_adapter_dtype"]


def default_adapter_dtype(device: torch.device | str) -> torch.dtype:
    """Adapters live in fp32 on CPU (no fast bf16 matmul there) and in bf16 on accelerators."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def base_weight(base: QuantizedTensor | torch.Tensor, dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    """The base weight ``[out, in]`` materialized in ``dtype`` (a fresh tensor for a quantized base)."""
    if isinstance(base, QuantizedTensor):
        return base.dequantize(dtype=dtype, backend=backend)
    return base.to(dtype)


class QuantizedMatmul(torch.autograd.Function):
    """``x [..., in] @ W[out, in]ᵀ`` for a frozen base ``W``; backward returns grad-input only.

    The base (``QuantizedTensor`` or dense tensor) is passed as a plain Python object, so autograd
    never tracks it; the dequantized weight is a temporary of forward and of backward, never saved.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: QuantizedTensor | torch.Tensor, backend: str) -> torch.Tensor:  # type: ignore[override]
        ctx.base = base
        ctx.backend = backend
        if isinstance(base, QuantizedTensor):
            from lowra_kernels.lut_matmul import lut_matmul

            return lut_matmul(x, base, backend)
        return F.linear(x, base.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad_x = None
        if ctx.needs_input_grad[0]:
            if isinstance(ctx.base, QuantizedTensor):
                from lowra_kernels.lut_matmul import lut_matmul_backward

                grad_x = lut_matmul_backward(grad_out.contiguous(), ctx.base, ctx.backend)
            else:
                grad_x = grad_out @ ctx.base.to(grad_out.dtype)
        return grad_x, None, None


class LowRALinear(nn.Module):
    """A frozen base ``[out, in]`` (quantized or dense) + optional bias + LoRA adapters.

    Args:
        base: a ``QuantizedTensor`` or a dense weight ``[out, in]`` (stored frozen, as a buffer).
        bias: optional ``[out]`` (frozen buffer; LoRA trains adapters only, as PEFT's ``bias="none"``).
        rank: LoRA rank r (0 disables the adapters: a pure quantized linear).
        alpha: LoRA alpha; the adapter output is scaled by ``alpha / rank``.
        dropout: dropout on the adapter input (training only).
        adapter_dtype: dtype of A and B; ``None`` → fp32 on CPU, bf16 on accelerators.
        backend: kernel backend for the base (``"auto"``, ``"torch"``, ``"triton"``).
    Adapters start at the standard LoRA init (A Kaiming-uniform, B = 0) unless ``lora_A`` /
    ``lora_B`` are given (e.g. from LoftQ).
    """

    def __init__(
        self,
        base: QuantizedTensor | torch.Tensor,
        bias: torch.Tensor | None = None,
        rank: int = 16,
        alpha: float = 16.0,
        dropout: float = 0.0,
        adapter_dtype: torch.dtype | None = None,
        lora_A: torch.Tensor | None = None,
        lora_B: torch.Tensor | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(base, QuantizedTensor):
            out_features, in_features = base.shape
            device = base.device
            self.qweight: QuantizedTensor | None = base
            self.register_buffer("dense_weight", None)
        elif isinstance(base, torch.Tensor) and base.dim() == 2:
            out_features, in_features = base.shape
            device = base.device
            self.qweight = None
            self.register_buffer("dense_weight", base.detach())
        else:
            raise ValueError(f"base must be a QuantizedTensor or a 2-D tensor, got {type(base).__name__}")
        if isinstance(rank, bool) or int(rank) != rank or rank < 0:
            raise ValueError(f"rank must be a non-negative integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank if self.rank else 0.0
        self.backend = backend
        if bias is not None:
            if bias.shape != (out_features,):
                raise ValueError(f"bias must have shape [{out_features}], got {tuple(bias.shape)}")
            self.register_buffer("bias", bias.detach())
        else:
            self.register_buffer("bias", None)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype = adapter_dtype or default_adapter_dtype(device)
        if self.rank:
            self.lora_A = nn.Parameter(torch.empty(self.rank, in_features, dtype=dtype, device=device))
            self.lora_B = nn.Parameter(torch.zeros(out_features, self.rank, dtype=dtype, device=device))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if lora_A is not None or lora_B is not None:
                self.set_adapters(lora_A, lora_B)
        else:
            self.lora_A = None
            self.lora_B = None

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        base: QuantizedTensor | None = None,
        **kwargs,
    ) -> LowRALinear:
        """Wrap ``linear``: its weight becomes the frozen base (quantized ``base`` if given)."""
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(base if base is not None else linear.weight.detach(), bias=bias, **kwargs)

    def set_adapters(self, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None) -> None:
        """Copy ``A [r, in]`` and ``B [out, r]`` into the adapters (either may be None = keep)."""
        with torch.no_grad():
            if lora_A is not None:
                if tuple(lora_A.shape) != tuple(self.lora_A.shape):
                    raise ValueError(f"lora_A must have shape {tuple(self.lora_A.shape)}, got {tuple(lora_A.shape)}")
                self.lora_A.copy_(lora_A)
            if lora_B is not None:
                if tuple(lora_B.shape) != tuple(self.lora_B.shape):
                    raise ValueError(f"lora_B must have shape {tuple(self.lora_B.shape)}, got {tuple(lora_B.shape)}")
                self.lora_B.copy_(lora_B)

    # ------------------------------------------------------------------ properties
    @property
    def base(self) -> QuantizedTensor | torch.Tensor:
        """The frozen base: a ``QuantizedTensor`` or the dense weight buffer."""
        return self.qweight if self.qweight is not None else self.dense_weight

    @property
    def is_quantized(self) -> bool:
        return self.qweight is not None

    @property
    def nominal_bits(self) -> float:
        """Code bits per base weight (the dense base counts its dtype's width)."""
        if self.qweight is not None:
            return self.qweight.nominal_bits
        return self.dense_weight.element_size() * 8.0

    @property
    def effective_bits(self) -> float:
        """Stored bits per base weight (codes, indices, codebooks, scales)."""
        if self.qweight is not None:
            return self.qweight.effective_bits
        return self.dense_weight.element_size() * 8.0

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base weight ``[out, in]`` in ``dtype`` (no adapters)."""
        return base_weight(self.base, dtype, self.backend)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The adapters' contribution ``s · B @ A`` ``[out, in]`` in ``dtype`` (zeros if rank 0)."""
        if not self.rank:
            return torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.device)
        with torch.no_grad():
            return (self.lora_B.float() @ self.lora_A.float() * self.scaling).to(dtype)

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``deq(base) + s · B @ A`` ``[out, in]``: the weight a plain ``nn.Linear`` would need."""
        with torch.no_grad():
            w = self.dequantized_weight(torch.float32)
            if self.rank:
                w = w + self.scaling * (self.lora_B.float() @ self.lora_A.float())
            return w.to(dtype)

    @property
    def device(self) -> torch.device:
        return self.qweight.device if self.qweight is not None else self.dense_weight.device

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` → ``[..., out]`` in ``x``'s dtype."""
        if self._fused_decode(x):
            from lowra_kernels.cpu_backend import lut_lora_gemv_cpu

            return lut_lora_gemv_cpu(x, self.qweight, self.lora_A, self.lora_B, self.scaling, self.bias)
        out = QuantizedMatmul.apply(x, self.base, self.backend)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        if self.rank:
            a = self.lora_A
            h = self.lora_dropout(x.to(a.dtype))
            out = out + (F.linear(F.linear(h, a), self.lora_B) * self.scaling).to(out.dtype)
        return out

    def _fused_decode(self, x: torch.Tensor) -> bool:
        """Whether this call can run as one CPU-extension call (base GEMV + adapters + bias).

        Inference only (no autograd graph is being built), a quantized base, fp32 activations,
        adapters and bias on the CPU, at most 16 rows (the decode case), no active dropout.
        """
        if torch.is_grad_enabled() or self.qweight is None or x.dtype != torch.float32 or x.is_cuda:
            return False
        if self.backend not in ("auto", "cpu") or x.numel() > 16 * self.in_features or x.numel() == 0:
            return False
        if self.qweight.device.type != "cpu" or (self.training and isinstance(self.lora_dropout, nn.Dropout)):
            return False
        for t in (self.lora_A, self.lora_B, self.bias):
            if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
                return False
        from lowra_kernels.dispatch import use_cpu

        return use_cpu(self.backend, x)

    def _apply(self, fn, recurse: bool = True):
        """Move the ``QuantizedTensor`` with the module (``.to(device)``, ``.cuda()``, ``.cpu()``).

        Its integer codes and fp16 codebooks never change dtype: ``model.to(torch.bfloat16)``
        casts only the dense parts (bias, adapters, other layers).
        """
        result = super()._apply(fn, recurse)
        if self.qweight is not None:
            probe = fn(torch.empty(0, device=self.qweight.device))
            if probe.device != self.qweight.device:
                self.qweight = self.qweight.to(probe.device)
        return result

    def extra_repr(self) -> str:
        if self.qweight is not None:
            mix = ",".join(f"{g.bits}b×{g.rows.numel()}" for g in self.qweight.groups)
            base = (
                f"bits={self.qweight.nominal_bits:.3g} [{mix}], effective_bits={self.qweight.effective_bits:.3g}, "
                f"method={self.qweight.method}"
            )
        else:
            base = f"bits={self.nominal_bits:.3g} (dense {self.dense_weight.dtype})"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {base}, rank={self.rank}, "
            f"alpha={self.alpha:g}, bias={self.bias is not None}"
        )
