"""``ShardedQuantizedWeight``: a ``QuantizedTensor`` as a torch tensor subclass that FSDP2 shards.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards the ``nn.Parameter`` s of a module along dim 0
and all-gathers them just in time. A LowRA base is not one dense tensor but a set of inner tensors
of different dtypes and shapes (per bit-width: int32 row indices, int32 packed codes, fp16
codebooks; fp16 absmax or int8 double-quantized scales). This subclass presents them to FSDP2 as
one frozen parameter of logical shape ``[out, in]`` (dtype = the compute dtype) and implements the
extension points FSDP2 offers for quantized parameters, as torchao's ``NF4Tensor`` does:

* ``__torch_dispatch__`` for the ops FSDP2 applies while sharding and unsharding (``split`` /
  ``chunk``, ``new_zeros``, ``slice`` / ``narrow``, ``copy_``, ``view``, ``as_strided``,
  ``detach``, ``alias``, ``_to_copy``, ``clone``, ``is_pinned``);
* ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``: the all-gather moves the inner tensors
  themselves (FSDP2 views mixed dtypes as bytes), never a float copy of the packed integers;
* ``__tensor_flatten__`` / ``__tensor_unflatten__`` (the traceable-subclass protocol).

**Sharding rule.** Every inner tensor ``t`` is flattened and cut into ``world`` equal pieces of
``L = ceil(t.numel() / world)`` elements; rank ``r`` keeps piece ``r`` (the last pieces padded
with zeros). So each rank stores 1/N of the packed codes, of the codebooks and of the scales,
whatever the mix of bit-widths (uneven row groups need no special case: the padding is inside
these pieces). Because pieces are filled in order, the valid elements are always the prefix
``[0, numel)`` of the gathered ``[world · L]`` buffer: the unsharded weight is made of VIEWS of
FSDP2's all-gather outputs (``gathered[:numel].view(shape)``), so when FSDP2 frees those outputs
after the layer ran, the full weight is gone too — no second copy stays resident.

Every piece reports the logical shape of the padded row chunk ``[ceil(out / world), in]`` so that
FSDP2 sees even sharding (its uneven-shard path would require all-gather inputs of the logical
shape, which packed data cannot have).

``ShardableLowRALinear`` is ``LowRALinear`` with its base held in such a parameter
(``qweight_shards``); :func:`make_bases_shardable` converts a quantized model in place before
``fully_shard``. Its ``qweight`` is the plain ``QuantizedTensor`` (views) while FSDP2 has the
layer unsharded (inside forward and backward); :func:`gather_quantized` rebuilds it on every rank
from the shards (a collective), e.g. to save a checkpoint a single process loads.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowra.format import BitGroup, QuantizedTensor
from lowra.linear import LowRALinear
from lowra.scales import DQ_BLOCK, GroupScales

if TYPE_CHECKING:  # pragma: no cover
    from lowra_kernels.weight import PackedWeight

__all__ = ["ShardableLowRALinear", "ShardedQuantizedWeight", "gather_quantized", "make_bases_shardable"]

aten = torch.ops.aten


def _attr(key: str) -> str:
    return "t_" + key.replace(".", "__")


def _piece_len(numel: int, world: int) -> int:
    return max(1, math.ceil(numel / world))


def _build_quantized(tensors: dict[str, torch.Tensor], meta: dict[str, Any], check: bool) -> QuantizedTensor:
    """A ``QuantizedTensor`` over ``tensors`` (no copy). ``check``: full validation (a load), else
    the trusted fast path used at every forward (the bytes were validated when sharded)."""
    if check:
        return QuantizedTensor.from_state_dict(tensors, meta)
    shape = (int(meta["shape"][0]), int(meta["shape"][1]))
    qt = QuantizedTensor.__new__(QuantizedTensor)
    qt.shape, qt.group_size, qt.method = shape, int(meta["group_size"]), meta.get("method", "unknown")
    qt.groups = [BitGroup(int(b), tensors[f"b{b}.rows"], tensors[f"b{b}.codes"], tensors[f"b{b}.codebook"])
                 for b in meta["bits"]]
    groups = math.ceil(shape[1] / qt.group_size)
    qt.scales = GroupScales.from_tensors(tensors, (shape[0], groups), int(meta.get("dq_block", DQ_BLOCK)))
    return qt


class ShardedQuantizedWeight(torch.Tensor):
    """A frozen quantized weight, logical shape ``[out, in]``, whole or as one rank's piece.

    Attributes:
        keys: names of the inner tensors (``QuantizedTensor.state_dict()`` keys), in a fixed order.
        qmeta: ``QuantizedTensor.metadata()`` plus ``inner_shapes`` / ``inner_dtypes`` of the whole
            inner tensors.
        world: the number of pieces (the FSDP2 world size this weight is sharded for).
        sharded: False: the inner tensors are whole (shapes ``inner_shapes``); True: each is a
            1-D piece of ``ceil(numel / world)`` elements.
    """

    keys: tuple[str, ...]
    qmeta: dict[str, Any]
    world: int
    sharded: bool

    @staticmethod
    def __new__(cls, inner: dict[str, torch.Tensor], qmeta: dict[str, Any], world: int, sharded: bool,
                size: torch.Size | tuple[int, ...], dtype: torch.dtype) -> ShardedQuantizedWeight:
        device = next(iter(inner.values())).device
        return torch.Tensor._make_wrapper_subclass(cls, tuple(size), dtype=dtype, device=device,
                                                   requires_grad=False)

    def __init__(self, inner: dict[str, torch.Tensor], qmeta: dict[str, Any], world: int, sharded: bool,
                 size: torch.Size | tuple[int, ...], dtype: torch.dtype) -> None:
        self.keys = tuple(inner)
        for key, t in inner.items():
            setattr(self, _attr(key), t)
        self.qmeta, self.world, self.sharded = qmeta, int(world), bool(sharded)

    # ------------------------------------------------------------------ construction / access
    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, world: int, dtype: torch.dtype = torch.float32
                       ) -> ShardedQuantizedWeight:
        """The whole weight ``qt`` (no copy), to be sharded over ``world`` ranks by FSDP2."""
        if world < 1:
            raise ValueError(f"world size must be >= 1, got {world}")
        inner = {k: v.detach().contiguous() for k, v in qt.state_dict().items()}
        meta = dict(qt.metadata())
        meta["inner_shapes"] = {k: list(v.shape) for k, v in inner.items()}
        meta["inner_dtypes"] = {k: str(v.dtype).removeprefix("torch.") for k, v in inner.items()}
        return cls(inner, meta, world, False, qt.shape, dtype)

    def inner(self) -> dict[str, torch.Tensor]:
        """The inner tensors by key (whole, or this rank's 1-D pieces)."""
        return {k: getattr(self, _attr(k)) for k in self.keys}

    @property
    def logical_shape(self) -> tuple[int, int]:
        return int(self.qmeta["shape"][0]), int(self.qmeta["shape"][1])

    def to_quantized(self, check: bool = False) -> QuantizedTensor:
        """The ``QuantizedTensor`` over the whole inner tensors (views, no copy)."""
        if self.sharded:
            raise RuntimeError(
                "this quantized base holds one rank's piece only (FSDP2-sharded): it is whole inside the "
                "layer's forward/backward, or use lowra.sharded.gather_quantized")
        return _build_quantized(self.inner(), self.qmeta, check)

    @property
    def resident_bytes(self) -> int:
        """Bytes this process stores for the weight (its pieces, or the whole inner tensors)."""
        return sum(t.numel() * t.element_size() for t in self.inner().values())

    def _with(self, inner: dict[str, torch.Tensor], sharded: bool | None = None,
              size: Any = None, dtype: torch.dtype | None = None) -> ShardedQuantizedWeight:
        return ShardedQuantizedWeight(inner, self.qmeta, self.world, self.sharded if sharded is None else sharded,
                                      self.shape if size is None else size, dtype or self.dtype)

    def _piece_size(self) -> tuple[int, int]:
        out, inn = self.logical_shape
        return (math.ceil(out / self.world), inn)

    def _pieces(self) -> list[ShardedQuantizedWeight]:
        """The ``world`` pieces of a whole weight (zero padded; each one's own storage)."""
        if self.sharded:
            raise RuntimeError("split of an already sharded quantized weight")
        per_key = {}
        for k, t in self.inner().items():
            flat = t.reshape(-1)
            n = _piece_len(flat.numel(), self.world)
            padded = flat.new_zeros(n * self.world)
            padded[: flat.numel()] = flat
            per_key[k] = padded.view(self.world, n)
        return [self._with({k: v[r].clone() for k, v in per_key.items()}, True, self._piece_size())
                for r in range(self.world)]

    def __repr__(self) -> str:  # no dispatch (the default repr would try to print values)
        state = f"piece of {self.world}" if self.sharded else "whole"
        return (f"ShardedQuantizedWeight(shape={self.logical_shape}, bits={self.qmeta['bits']}, {state}, "
                f"resident_bytes={self.resident_bytes})")

    # ------------------------------------------------------------------ traceable subclass protocol
    def __tensor_flatten__(self) -> tuple[list[str], tuple]:
        return [_attr(k) for k in self.keys], (self.keys, self.qmeta, self.world, self.sharded, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner_tensors: dict[str, torch.Tensor], ctx: tuple, outer_size: Any,
                             outer_stride: Any) -> ShardedQuantizedWeight:
        keys, qmeta, world, sharded, dtype = ctx
        inner = {k: inner_tensors[_attr(k)] for k in keys}
        return ShardedQuantizedWeight(inner, qmeta, world, sharded, outer_size, dtype)

    # ------------------------------------------------------------------ FSDP2 all-gather extension
    def fsdp_pre_all_gather(self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...],
                            module: nn.Module, mp_policy: Any) -> tuple[tuple[torch.Tensor, ...], Any]:
        """This rank's 1-D pieces, as they are (integers stay integers: no cast, no float copy)."""
        if not self.sharded:
            raise RuntimeError("fsdp_pre_all_gather on a whole (unsharded) quantized weight")
        if mesh.size() != self.world:
            raise RuntimeError(f"quantized weight sharded for {self.world} ranks, FSDP2 mesh has {mesh.size()}")
        return tuple(getattr(self, _attr(k)) for k in self.keys), None

    def fsdp_post_all_gather(self, all_gather_outputs: tuple[torch.Tensor, ...], metadata: Any,
                             param_dtype: torch.dtype, *, out: torch.Tensor | None = None) -> Any:
        """The whole weight as views ``gathered[:numel].view(shape)`` of the all-gather outputs.

        With ``out`` (every later all-gather) the outputs were refilled in the same storage that
        ``out``'s views already use: nothing to do but check that.
        """
        shapes = self.qmeta["inner_shapes"]
        inner = {}
        for k, gathered in zip(self.keys, all_gather_outputs, strict=True):
            numel = math.prod(shapes[k])
            inner[k] = gathered.reshape(-1)[:numel].view(shapes[k])
        if out is not None:
            assert isinstance(out, ShardedQuantizedWeight)
            for k, t in out.inner().items():
                if t.untyped_storage().data_ptr() != inner[k].untyped_storage().data_ptr():
                    with torch.no_grad():
                        t.copy_(inner[k])
            return None
        whole = ShardedQuantizedWeight(inner, self.qmeta, self.world, False, self.logical_shape, param_dtype)
        return whole, ()

    # ------------------------------------------------------------------ dispatch
    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        handler = _OPS.get(func)
        if handler is None:
            raise NotImplementedError(
                f"ShardedQuantizedWeight does not support {func} (a frozen quantized base: dequantize it with "
                "to_quantized().dequantize() for dense math)")
        return handler(func, *args, **kwargs)


# ---------------------------------------------------------------------------------- op handlers

_OPS: dict[Any, Any] = {}


def _implements(*ops: Any):
    def register(fn):
        for op in ops:
            _OPS[op] = fn
        return fn
    return register


@_implements(aten.detach.default, aten.alias.default)
def _detach(func: Any, self: ShardedQuantizedWeight) -> ShardedQuantizedWeight:
    return self._with({k: func(t) for k, t in self.inner().items()})


@_implements(aten.clone.default)
def _clone(func: Any, self: ShardedQuantizedWeight, memory_format: Any = None) -> ShardedQuantizedWeight:
    return self._with({k: t.clone() for k, t in self.inner().items()})


@_implements(aten.is_pinned.default)
def _is_pinned(func: Any, self: ShardedQuantizedWeight, device: Any = None) -> bool:
    return all(t.is_pinned() for t in self.inner().values())


@_implements(aten._to_copy.default)
def _to_copy(func: Any, self: ShardedQuantizedWeight, dtype: torch.dtype | None = None, layout: Any = None,
             device: Any = None, pin_memory: Any = None, non_blocking: bool = False, memory_format: Any = None
             ) -> ShardedQuantizedWeight:
    # the logical dtype only (the compute dtype); the inner tensors keep theirs
    inner = {k: t.to(device=device, non_blocking=non_blocking) if device is not None else t.clone()
             for k, t in self.inner().items()}
    return self._with(inner, dtype=dtype or self.dtype)


def _resolve(size: Any, numel: int) -> tuple[int, ...]:
    size = list(size)
    if -1 in size:
        known = math.prod(s for s in size if s != -1)
        size[size.index(-1)] = numel // max(1, known)
    return tuple(size)


@_implements(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(func: Any, self: ShardedQuantizedWeight, size: Any) -> ShardedQuantizedWeight:
    # FSDP2 keeps `padded.view(-1)` as its flat handle; the pieces are already flat
    return self._with({k: t.detach() for k, t in self.inner().items()}, size=_resolve(size, self.numel()))


@_implements(aten.as_strided.default)
def _as_strided(func: Any, self: ShardedQuantizedWeight, size: Any, stride: Any, storage_offset: int = 0
                ) -> ShardedQuantizedWeight:
    if storage_offset not in (0, None):
        raise NotImplementedError("as_strided with an offset on a quantized weight")
    return self._with({k: t.detach() for k, t in self.inner().items()}, size=tuple(size))


@_implements(aten.slice.Tensor)
def _slice(func: Any, self: ShardedQuantizedWeight, dim: int = 0, start: int | None = 0, end: int | None = None,
           step: int = 1) -> ShardedQuantizedWeight:
    # FSDP2 narrows its padded piece to the rank's rows: every piece is the padded size (see module
    # docstring), so the narrowed piece aliases the whole piece
    if dim != 0 or (start or 0) != 0 or step != 1:
        raise NotImplementedError(f"slice(dim={dim}, start={start}, step={step}) of a quantized weight")
    rows = min(self.shape[0], end if end is not None else self.shape[0])
    return self._with(self.inner(), size=(rows, *self.shape[1:]))


@_implements(aten.split.Tensor, aten.split_with_sizes.default)
def _split(func: Any, self: ShardedQuantizedWeight, split: Any, dim: int = 0) -> list[ShardedQuantizedWeight]:
    if dim != 0:
        raise NotImplementedError("a quantized weight is sharded along its output rows (dim 0) only")
    want = math.ceil(self.logical_shape[0] / self.world)
    size = split if isinstance(split, int) else max(split)
    if size != want:
        raise RuntimeError(
            f"FSDP2 shards this quantized weight into chunks of {size} rows, but it was prepared for "
            f"{self.world} ranks ({want} rows each): call make_bases_shardable with the mesh's world size")
    return self._pieces()


@_implements(aten.new_zeros.default, aten.new_empty.default)
def _new_zeros(func: Any, self: ShardedQuantizedWeight, size: Any, dtype: Any = None, layout: Any = None,
               device: Any = None, pin_memory: Any = None) -> ShardedQuantizedWeight:
    shapes, ref = self.qmeta["inner_shapes"], self.inner()
    inner = {k: torch.zeros(_piece_len(math.prod(shapes[k]), self.world), dtype=ref[k].dtype,
                            device=device or ref[k].device) for k in self.keys}
    return self._with(inner, sharded=True, size=tuple(size))


@_implements(aten.copy_.default)
def _copy(func: Any, dst: ShardedQuantizedWeight, src: Any, non_blocking: bool = False) -> ShardedQuantizedWeight:
    if not isinstance(src, ShardedQuantizedWeight) or src.sharded != dst.sharded or src.keys != dst.keys:
        raise RuntimeError("copy_ into a quantized weight needs a quantized weight of the same layout")
    for k in dst.keys:
        getattr(dst, _attr(k)).copy_(getattr(src, _attr(k)))
    return dst


# ------------------------------------------------------------------------------ the module


class ShardableLowRALinear(LowRALinear):
    """``LowRALinear`` whose quantized base is the frozen parameter ``qweight_shards``.

    Made by :func:`make_bases_shardable` (class swap of an existing layer, nothing recomputed).
    ``qweight`` reads the base back as a ``QuantizedTensor`` of views — valid while FSDP2 holds
    the layer unsharded (forward/backward), an error while it is sharded.
    """

    @property
    def qweight(self) -> QuantizedTensor:  # type: ignore[override]
        return _local(self._parameters["qweight_shards"]).to_quantized()

    @qweight.setter
    def qweight(self, value: Any) -> None:
        raise AttributeError("the base of a ShardableLowRALinear is the parameter qweight_shards")

    @property
    def base(self) -> QuantizedTensor:  # type: ignore[override]
        return self.qweight

    @property
    def _packed(self) -> PackedWeight:
        """The kernels' view of the base, read anew each call, as copies: FSDP2 frees and re-allocates
        the gathered storage between forwards, and the kernels' caches (``WeightCache``: the CPU
        extension's raw pointers, launch plans) must never see a view whose memory moved."""
        w = self.qweight.packed()
        return w._replace(codes=tuple(t.clone() for t in w.codes), rows=tuple(t.clone() for t in w.rows),
                          codebooks=tuple(t.clone() for t in w.codebooks), absmax=w.absmax.clone())

    @property
    def _op_weight(self) -> tuple[list[torch.Tensor], list[int]]:
        return self._packed.op_args()

    @property
    def is_quantized(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return _local(self._parameters["qweight_shards"]).device

    @property
    def nominal_bits(self) -> float:
        return float(self._bits[0])

    @property
    def effective_bits(self) -> float:
        return float(self._bits[1])

    def _apply(self, fn, recurse: bool = True):
        return nn.Module._apply(self, fn, recurse)  # the base is a parameter: moved like any other

    def extra_repr(self) -> str:
        w = _local(self._parameters["qweight_shards"])
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.nominal_bits:.3g}, "
                f"base={w!r}, rank={self.rank}")


def _local(p: torch.Tensor) -> ShardedQuantizedWeight:
    local = getattr(p, "_local_tensor", p)  # the DTensor FSDP2 registers between forwards
    if not isinstance(local, ShardedQuantizedWeight):
        raise TypeError(f"expected a ShardedQuantizedWeight, got {type(local).__name__}")
    return local


def make_bases_shardable(model: nn.Module, world: int) -> int:
    """Turn every quantized ``LowRALinear`` of ``model`` into a ``ShardableLowRALinear`` (in place).

    The ``QuantizedTensor`` is wrapped without a copy; FSDP2's ``fully_shard`` (with a mesh of
    ``world`` ranks) then keeps 1/world of it per rank. Returns the number of layers converted.
    """
    n = 0
    for module in model.modules():
        if type(module) is LowRALinear and module.is_quantized:
            qt = module.qweight
            bits = (qt.nominal_bits, qt.effective_bits)
            for cached in ("_qweight", "_packed", "_op_weight"):  # the base becomes the parameter below
                module.__dict__.pop(cached, None)
            module.__class__ = ShardableLowRALinear
            module._bits = bits
            dtype = torch.float32
            module.register_parameter(
                "qweight_shards", nn.Parameter(ShardedQuantizedWeight.from_quantized(qt, world, dtype),
                                               requires_grad=False))
            n += 1
    return n


def gather_quantized(p: torch.Tensor, group: Any = None) -> QuantizedTensor:
    """The whole ``QuantizedTensor`` from this rank's piece (all ranks must call: a collective).

    The result is validated like a loaded file (structure, finite codebooks and scales).
    """
    import torch.distributed as dist

    local = _local(p)
    if not local.sharded:
        return local.to_quantized(check=True)
    shapes, tensors = local.qmeta["inner_shapes"], {}
    for k, piece in local.inner().items():
        parts = [torch.empty_like(piece) for _ in range(local.world)]
        dist.all_gather(parts, piece.contiguous(), group=group)
        tensors[k] = torch.cat(parts)[: math.prod(shapes[k])].view(shapes[k]).clone()
    return _build_quantized(tensors, local.qmeta, check=True)


def quantized_resident_bytes(model: nn.Module) -> int:
    """Bytes of quantized base this process stores: pieces for sharded layers, whole otherwise."""
    total = 0
    for module in model.modules():
        if isinstance(module, ShardableLowRALinear):
            total += _local(module._parameters["qweight_shards"]).resident_bytes
        elif isinstance(module, LowRALinear) and module.is_quantized:
            total += module.qweight.nbytes
    return total
