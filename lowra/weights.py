"""Where the full-precision weights come from: a loaded model, or safetensors shards read tensor by tensor.

A :class:`WeightSource` gives the quantization stages what they read of the full-precision model:
a target layer's weight and bias (:meth:`~WeightSource.weight`, :meth:`~WeightSource.bias`), and
for block-wise calibration (:mod:`lowra.blockwise`) a few submodules with real weights for a while
(:meth:`~WeightSource.materialized`: one decoder block, or the embedding / final norm / LM head).

- :class:`ModelSource`: the model in memory (``lowra.quantize_model``); everything is already there.
- :class:`ShardSource`: a checkpoint never loaded whole (``lowra.quantize_pretrained``): the model is
  a skeleton on the meta device; a weight is read from its shard when asked for, and a materialized
  submodule goes back to the meta device when the ``with`` block ends, so one block's weights are
  held at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from lowra.validation import check_weight

if TYPE_CHECKING:  # pragma: no cover
    from lowra.streaming.source import ShardReader

__all__ = ["ModelSource", "ShardSource", "WeightSource"]


class WeightSource:
    """The full-precision weights of ``model``'s layers (see the module docstring)."""

    model: nn.Module
    #: where weights and calibration activations live
    device: torch.device

    def weight(self, name: str) -> torch.Tensor:
        """The weight ``[out, in]`` of linear ``name``, checked finite."""
        raise NotImplementedError

    def bias(self, name: str) -> torch.Tensor | None:
        """The bias ``[out]`` of linear ``name`` (None without one), checked finite."""
        raise NotImplementedError

    @contextmanager
    def materialized(self, names: Sequence[str]) -> Iterator[None]:
        """Inside, the submodules ``names`` of ``model`` hold their real weights."""
        yield


class ModelSource(WeightSource):
    """The weights of a model in memory (nothing to load, nothing to release)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        first = next(model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")

    def weight(self, name: str) -> torch.Tensor:
        w = self.model.get_submodule(name).weight.detach()
        check_weight(w, f"layer {name!r} weight")
        return w

    def bias(self, name: str) -> torch.Tensor | None:
        b = self.model.get_submodule(name).bias
        if b is not None:
            check_weight(b.detach()[None], f"layer {name!r} bias")
            return b.detach()
        return None


class ShardSource(WeightSource):
    """The weights of a safetensors checkpoint, read tensor by tensor into a meta-device ``model``.

    ``dtype``: the dtype weights are read in (None: as stored); ``device``: where they go.
    """

    def __init__(self, model: nn.Module, reader: ShardReader, dtype: torch.dtype | None,
                 device: torch.device) -> None:
        self.model, self.reader, self.dtype, self.device = model, reader, dtype, device
        names: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
        #: parameter name → the other names of the same (tied) parameter, e.g. lm_head ↔ embed_tokens
        self.tied = {n: [m for m in group if m != n] for group in names.values() for n in group if len(group) > 1}

    def tensor(self, key: str) -> torch.Tensor:
        """The model's tensor ``key`` (its state-dict name) from the checkpoint, on the work device
        (a tied parameter the checkpoint stores once under another name is read under that name)."""
        from lowra.streaming.source import source_key

        try:
            stored = source_key(self.model, self.reader, key)
        except ValueError:
            others = [k for k in self.tied.get(key, []) if self._has(k)]
            if not others:
                raise
            stored = source_key(self.model, self.reader, others[0])
        return self.reader.load(stored, self.dtype).to(self.device)

    def _has(self, key: str) -> bool:
        from lowra.streaming.source import source_key

        try:
            source_key(self.model, self.reader, key)
        except ValueError:
            return False
        return True

    def weight(self, name: str) -> torch.Tensor:
        w = self.tensor(f"{name}.weight")
        check_weight(w, f"layer {name!r} weight")
        shape = tuple(self.model.get_submodule(name).weight.shape)
        if tuple(w.shape) != shape:
            raise ValueError(f"layer {name!r}: the checkpoint's weight has shape {tuple(w.shape)}, "
                             f"the config builds {shape}")
        return w

    def bias(self, name: str) -> torch.Tensor | None:
        if self.model.get_submodule(name).bias is None:
            return None
        b = self.tensor(f"{name}.bias")
        check_weight(b[None], f"layer {name!r} bias")
        return b

    @contextmanager
    def materialized(self, names: Sequence[str]) -> Iterator[None]:
        """Load the parameters and persistent buffers of submodules ``names`` from the checkpoint
        (non-persistent buffers such as rotary frequencies are rebuilt from the config); on exit
        every one of them is the skeleton's meta tensor again (ties such as a shared embedding kept)."""
        modules = [self.model.get_submodule(n) if n else self.model for n in names]
        saved = [(owner, leaf, t) for module in modules for owner in module.modules()
                 for leaf, t in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]]
        try:
            for name, module in zip(names, modules):
                self._load(name, module)
            yield
        finally:
            for owner, leaf, t in saved:
                setattr(owner, leaf, t)

    def _load(self, name: str, module: nn.Module) -> None:
        prefix = f"{name}." if name else ""
        state = {}
        for key in module.state_dict():
            t = self.tensor(prefix + key)
            check_weight(t.reshape(1, -1).float(), f"tensor {prefix + key!r}")
            state[key] = t
        module.load_state_dict(state, strict=True, assign=True)
        for sub_name, sub in module.named_modules():
            if any(b is not None and b.device.type == "meta" for b in sub.buffers(recurse=False)):
                self._rebuild_buffers(f"{prefix}{sub_name}", sub)

    def _rebuild_buffers(self, name: str, module: nn.Module) -> None:
        """Non-persistent buffers (not in the checkpoint) computed from the config: rotary embeddings."""
        config = getattr(self.model, "config", None)
        if "RotaryEmbedding" not in type(module).__name__ or config is None:
            meta = [n for n, b in module.named_buffers(recurse=False) if b.device.type == "meta"]
            raise ValueError(f"module {name!r} has buffers {meta} that are not in the checkpoint; "
                             "block-wise calibration cannot rebuild them")
        with torch.device(self.device):
            fresh = type(module)(config=getattr(config, "text_config", None) or config)
        for key, buf in fresh.named_buffers(recurse=False):
            module.register_buffer(key, buf, persistent=False)
        for key, value in vars(fresh).items():
            if isinstance(value, torch.Tensor) and not key.startswith("_"):
                setattr(module, key, value)
