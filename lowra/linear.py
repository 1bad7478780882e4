"""``LowRALinear``: a frozen (quantized or dense) base weight plus trainable LoRA adapters.

``y = base(x) + bias + s · dropout(x) @ Aᵀ @ Bᵀ`` with ``A [r, in]``, ``B [out, r]`` and the LoRA
scale ``s = alpha / r`` (PEFT's ``lora_A.weight`` / ``lora_B.weight`` convention, so adapters
export to PEFT without transposes).

The base is either a ``QuantizedTensor`` (1–4 bits per output row) or a frozen dense weight (the
plain-LoRA baseline, ``method="none"``). A quantized layer's whole forward is one custom op,
``torch.ops.lowra.lut_linear`` (``lowra_kernels.lut_linear``): it takes the weight as tensors (the
layer keeps ``QuantizedTensor.packed()``, built once per weight and device), runs the fused Triton LUT
kernels on CUDA and the C++ extension on CPU (one call per layer for decode-sized fp32 input), and its
registered backward returns gradients for the input and the adapters only. No gradient, optimizer
state or persistent copy of the base weight ever exists, so memory is codes + adapters + activations.
``train_base_tables`` (``train.codebooks`` / ``train.scales``) makes the codebooks and/or group scales
fp32 parameters too: the op reads them (rounded to their stored fp16) and its backward gives them
``lowra_kernels.codebook_grad``'s segment sums; the packed codes stay frozen.
Being an op with a fake implementation, it is captured whole by ``torch.compile(fullgraph=True)``
and CUDA graphs; it is also correct under gradient checkpointing (forward is simply recomputed) and
under ``torch.no_grad`` (nothing is saved). With active LoRA dropout the adapter branch runs outside
the op on the dropped-out input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowra.format import QuantizedTensor
from lowra_kernels.lut_linear import (  # (importing it registers torch.ops.lowra.*)
    lut_linear_autograd,
    lut_linear_forward,
    lut_linear_unchecked,
)
from lowra_kernels.weight import PackedWeight

__all__ = ["LowRALinear", "base_weight", "default_adapter_dtype"]


def default_adapter_dtype(device: torch.device | str) -> torch.dtype:
    """Adapters live in fp32 on CPU (no fast bf16 matmul there) and in bf16 on accelerators."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def base_weight(base: QuantizedTensor | torch.Tensor, dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    """The base weight ``[out, in]`` materialized in ``dtype`` (a fresh tensor for a quantized base)."""
    if isinstance(base, QuantizedTensor):
        return base.dequantize(dtype=dtype, backend=backend)
    return base.to(dtype)


def _records_autograd(x: torch.Tensor, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
                      bias: torch.Tensor | None) -> bool:
    """Whether a call on ``x`` with these adapters and bias builds an autograd graph (grad mode on and
    one of them requires grad); the base's own tables are the layer's concern."""
    return torch.is_grad_enabled() and (
        x.requires_grad or (lora_A is not None and (lora_A.requires_grad or lora_B.requires_grad))
        or (bias is not None and bias.requires_grad))


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
            self.qweight = base
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
    def qweight(self) -> QuantizedTensor | None:
        """The quantized base (``None`` for a dense base). Setting it rebuilds the kernels' view.

        With trainable codebooks / scales (``train_base_tables``) its stored fp16 tables are first
        brought up to date with the parameters' values (so saving, merging and export see them)."""
        if getattr(self, "_synced", None) is not None:
            self._sync_base_tables()
        return self._qweight

    @qweight.setter
    def qweight(self, value: QuantizedTensor | None) -> None:
        self._qweight = value
        self._packed = value.packed() if value is not None else None
        self._op_weight = self._packed.op_args() if value is not None else None

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

    # ------------------------------------------------------------------ trainable base tables
    def train_base_tables(self, codebooks: bool = False, scales: bool = False) -> list[nn.Parameter]:
        """Make the quantized base's codebooks (one ``[n_j or 1, 2**b_j]`` per stored width) and/or its
        group absmax ``[out, groups]`` trainable: fp32 parameters ``trainable_codebooks.j`` /
        ``trainable_absmax`` initialised from the stored values, read by the op (rounded to the stored
        dtype) and given gradients by its backward; the packed codes stay frozen. They are not in
        ``state_dict()`` (the checkpoint keeps its format): the stored tables take their values
        (``qweight``). Returns the new parameters; a dense base or nothing asked returns ``[]``."""
        if self._qweight is None or not (codebooks or scales):
            return []
        if scales and self._qweight.scales.double_quant:
            raise ValueError("trainable scales need fp16-stored absmax (quant.double_quant=false): double-quantized "
                             "scales are 8-bit codes")
        if getattr(self, "_synced", None) is not None:
            raise ValueError("the base tables of this layer are already trainable")
        w = self._packed
        new: list[nn.Parameter] = []
        if codebooks:
            self.trainable_codebooks = nn.ParameterList([nn.Parameter(cb.detach().float()) for cb in w.codebooks])
            new += list(self.trainable_codebooks)
        if scales:
            self.trainable_absmax = nn.Parameter(w.absmax.detach().float())
            new.append(self.trainable_absmax)
        self.register_state_dict_post_hook(_drop_base_tables)
        self.register_load_state_dict_post_hook(_allow_missing_base_tables)
        self._synced = self._table_versions()
        return new

    def _base_table_params(self) -> list[tuple[int, nn.Parameter]]:
        """``(slot in op_args' tensors, parameter)`` of every trainable table (empty when frozen)."""
        if getattr(self, "_synced", None) is None:
            return []
        n = len(self._packed.bits)
        out = [(2 * n + j, p) for j, p in enumerate(getattr(self, "trainable_codebooks", None) or [])]
        if getattr(self, "trainable_absmax", None) is not None:
            out.append((3 * n, self.trainable_absmax))
        return out

    def _table_versions(self) -> tuple:
        return tuple((id(p), p._version) for _, p in self._base_table_params())

    def _sync_base_tables(self) -> None:
        """Copy the parameters' values (rounded to the stored dtype) into the stored tables if changed."""
        versions = self._table_versions()
        if versions == self._synced:
            return
        stored = self._op_weight[0]
        with torch.no_grad():
            for slot, p in self._base_table_params():
                stored[slot].copy_(p.detach().to(stored[slot].dtype))
        self._synced = versions

    def _op_tensors(self) -> list[torch.Tensor]:
        """``op_args``' tensors, with the trainable tables' parameters (cast to the stored dtype) in place."""
        tensors = self._op_weight[0]
        params = self._base_table_params()
        if not params:
            return tensors
        tensors = list(tensors)
        for slot, p in params:
            tensors[slot] = p.to(tensors[slot].dtype)
        return tensors

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` → ``[..., out]`` in ``x``'s dtype.

        A quantized base is one ``lowra::lut_linear`` call with the adapters inside (unless LoRA dropout is
        active): under ``torch.compile`` (and with trainable base tables) the op itself; in eager mode its
        implementation without the dispatcher — ``lut_linear_autograd`` when the call records autograd,
        ``lut_linear_unchecked`` otherwise — the same numbers at a fraction of the host time."""
        packed = self._packed
        if packed is None:
            out = F.linear(x, self.dense_weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
            if self.rank:
                h = self.lora_dropout(x.to(self.lora_A.dtype))
                out = out + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(out.dtype)
            return out
        a = self.lora_A
        fused = a is not None and not (self.training and isinstance(self.lora_dropout, nn.Dropout))
        b = self.lora_B if fused else None
        if not fused:
            a = None
        bias = self.bias
        tensors, meta = self._op_weight
        if torch.compiler.is_compiling() or getattr(self, "_synced", None) is not None:
            tensors = self._op_tensors()
            if torch.compiler.is_compiling() or self._records_autograd(x, a):
                out = torch.ops.lowra.lut_linear(x, tensors, a, b, bias, meta, self.scaling, self.backend)
            else:
                out = lut_linear_forward(x, PackedWeight.from_op_args(tensors, meta), a, b, bias, self.scaling,
                                         self.backend)
        else:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"x has {x.shape[-1]} features, the layer expects {self.in_features}")
            if _records_autograd(x, a, b, bias):
                out = lut_linear_autograd(x, packed, tensors, meta, a, b, bias, self.scaling, self.backend)
            else:  # nothing to record
                out = lut_linear_unchecked(x, packed, a, b, bias, self.scaling, self.backend)
        if fused or not self.rank:
            return out
        h = self.lora_dropout(x.to(self.lora_A.dtype))
        return out + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(out.dtype)

    def _records_autograd(self, x: torch.Tensor, lora_A: torch.Tensor | None) -> bool:
        """Whether this call builds an autograd graph (grad mode on and an input that requires grad)."""
        if torch.is_grad_enabled() and any(p.requires_grad for _, p in self._base_table_params()):
            return True
        return _records_autograd(x, lora_A, self.lora_B, self.bias)

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


_TABLE_KEYS = ("trainable_codebooks.", "trainable_absmax")


def _drop_base_tables(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post-hook: trainable base tables live in the stored ``QuantizedTensor``, not here."""
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].startswith(_TABLE_KEYS)]:
        del state_dict[key]


def _allow_missing_base_tables(module: nn.Module, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: the trainable tables are never in a state dict (``_drop_base_tables``)."""
    missing = incompatible_keys.missing_keys
    for key in [k for k in missing if k.rsplit(".", 2)[-2:-1] == ["trainable_codebooks"] or
                k.endswith("trainable_absmax")]:
        missing.remove(key)
