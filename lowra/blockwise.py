"""Block-wise calibration: the calibration windows go through the model one decoder block at a time.

As GPTQ-style tools do, the inputs of the first decoder block are captured (the embedding runs and
the first block's call is stopped), then every block in turn maps the hidden states of each
calibration chunk to its output.  Only one block's weights are needed at a time
(:class:`lowra.weights.WeightSource`: a loaded model, or shards read tensor by tensor) and one
block's statistics are complete when its turn ends; :class:`StatStore` writes them to disk, so the
statistics are held one block at a time, in memory and streamed alike.

* **Forward-only statistics** (input Grams of the calibrated init, OPTQ's Hessians): one sweep over
  the blocks; the hidden states of one block boundary (every chunk) are kept between blocks.
* **Gradient statistics** (K-FAC output factors ``G``, the diagonal Fisher): a forward sweep that
  writes every block boundary to the spill directory; the loss gradient at the last boundary (final
  norm and LM head over slices of ``head_tokens`` positions, the cross-entropy gradient in closed
  form, so the ``[tokens, vocab]`` logits never exist whole and each slice's are computed once);
  then a backward sweep in reverse: block ``i`` is recomputed from its stored input under autograd,
  its output gradient is pushed through it, hooks collect its layers' input Grams, output-gradient
  energies and weight gradients, and the input gradient becomes block ``i - 1``'s
  output gradient.  Per chunk the loss is the chunk's mean next-token NLL, as in the whole-model
  pass of :func:`lowra.calibration.collect_fisher`, so the statistics are the same quantities.

Numerics follow the whole-model passes: Grams accumulated from fp32 chunk products in float64 when
gradients are collected (``collect_fisher``), in float64 throughout otherwise (``collect_hessians``).
Progress: a line per chunk of each sweep (and of the loss gradient) at most every 4 s, heartbeats
between (``lowra.progress``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowra.calibration import calibration_batches, head_loss_gradient, large_allocations_mapped, plain_head
from lowra.methods import CalibrationNeeds
from lowra.progress import Ticker, activity
from lowra.weights import WeightSource

__all__ = ["BlockLayout", "StatStore", "block_layout", "blockwise_statistics"]


# ------------------------------------------------------------------------------------ layout
@dataclass
class BlockLayout:
    """The decoder of a causal LM as blocks: ``decoder`` (embeds, runs ``layers``, ``norm``), the
    module names of its layers (``prefixes``), of the modules the embedding step needs
    (``trunk``: everything of the decoder but its layers) and of the final norm and LM head
    (``head``), and the target layers of each block (``targets[i]``)."""

    decoder: nn.Module
    layers: list[nn.Module]
    prefixes: list[str]
    trunk: list[str]
    head: list[str]
    norm: nn.Module
    lm_head: nn.Module
    targets: list[list[str]] = field(default_factory=list)


def block_layout(model: nn.Module, names: Sequence[str]) -> BlockLayout:
    """The block layout of ``model`` for target layers ``names``; ValueError saying what is missing
    when the model is not a plain decoder (``get_decoder().layers`` + ``.norm``, an unscaled
    ``nn.Linear`` head, one attention type) or a target lies outside its blocks."""
    parts = plain_head(model)
    decoder = parts[0] if parts else None
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    if parts is None or not isinstance(layers, nn.ModuleList) or not isinstance(norm, nn.Module):
        raise ValueError(f"block-wise calibration needs a decoder with .layers and .norm and a plain LM head; "
                         f"{type(model).__name__} has none")
    kinds = set(getattr(getattr(model, "config", None), "layer_types", None) or ())
    if len(kinds) > 1:
        raise ValueError(f"block-wise calibration runs every block with the first block's attention mask; "
                         f"{type(model).__name__} mixes attention types {sorted(kinds)}")
    where = {id(m): n for n, m in model.named_modules()}
    prefixes = [where[id(layer)] for layer in layers]
    dec = where[id(decoder)]
    trunk = [f"{dec}.{n}" if dec else n for n, m in decoder.named_children() if m is not layers and m is not norm]
    targets: list[list[str]] = [[] for _ in layers]
    for name in names:
        i = next((i for i, p in enumerate(prefixes) if name.startswith(p + ".")), None)
        if i is None:
            raise ValueError(f"block-wise calibration: target {name!r} is not inside a decoder block")
        targets[i].append(name)
    return BlockLayout(decoder, list(layers), prefixes, trunk, [where[id(norm)], where[id(parts[1])]], norm,
                       parts[1], targets)


# ------------------------------------------------------------------------------------ storage
class StatStore:
    """One safetensors file of statistics per block in ``directory`` (a temporary one by default),
    and the spill files of the block boundaries (raw tensors read back with plain reads, so they
    never count as mapped memory)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.owned = directory is None
        self.path = Path(tempfile.mkdtemp(prefix="lowra-calib-")) if directory is None else Path(directory)
        self.path.mkdir(parents=True, exist_ok=True)
        self.cached: tuple[int, dict[str, str]] | None = None  # (block, its aliases)

    def put(self, block: int, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
        from lowra.format import save_safetensors_atomic

        save_safetensors_atomic({k: v.contiguous().cpu() for k, v in tensors.items()}, self.file(block),
                                {"aliases": json.dumps(aliases)})

    def file(self, block: int) -> Path:
        return self.path / f"stats-{block:05d}.safetensors"

    def has(self, block: int) -> bool:
        return self.file(block).is_file()

    def get(self, block: int, key: str) -> torch.Tensor | None:
        """Tensor ``key`` (``"<layer>/<kind>"``) of ``block``, read alone from the block's file (so a
        layer's Gram is in memory only while that layer is worked on); None when absent."""
        from safetensors import safe_open

        with safe_open(str(self.file(block)), framework="pt") as f:
            if self.cached is None or self.cached[0] != block:
                self.cached = (block, json.loads((f.metadata() or {}).get("aliases", "{}")))
            aliases = self.cached[1]
            layer, _, kind = key.partition("/")
            if kind == "hessian":
                key = f"{aliases.get(layer, layer)}/{kind}"
            return f.get_tensor(key) if key in f.keys() else None

    def spill(self, tag: str, chunk: int, t: torch.Tensor) -> None:
        t.detach().contiguous().cpu().view(torch.uint8).numpy().tofile(self.path / f"{tag}-{chunk:05d}.bin")

    def unspill(self, tag: str, chunk: int, like: tuple[torch.Size, torch.dtype], device: torch.device,
                keep: bool = False) -> torch.Tensor:
        path = self.path / f"{tag}-{chunk:05d}.bin"
        raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
        if not keep:
            path.unlink()
        return raw.view(like[1]).reshape(like[0]).to(device)

    def close(self) -> None:
        self.cached = None
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)


# ------------------------------------------------------------------------------------ hooks
class _BlockHooks:
    """Forward hooks on one block's target linears: input Grams (layers that read the same input
    tensor share one), output-gradient energies, weight-gradient squares; ``tensors()`` gives the
    block's statistics, divided by their counts."""

    def __init__(self, model: nn.Module, block: nn.Module, names: list[str], needs: CalibrationNeeds,
                 fp32_chunks: bool) -> None:
        self.needs, self.fp32_chunks = needs, fp32_chunks
        for p in block.parameters():  # materialized weights come back trainable: only activations need grads
            p.requires_grad_(False)
        self.grams: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.gsums: dict[str, torch.Tensor] = {}
        self.gcounts: dict[str, int] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}
        self.seen: dict[int, tuple[weakref.ref, str]] = {}
        self.handles: list[Any] = []
        self.chunks = 0
        self.params: list[torch.Tensor] = []
        for name in names:
            linear = model.get_submodule(name)
            self.handles.append(linear.register_forward_hook(self._forward(name)))
            if needs.fisher:
                linear.weight.requires_grad_(True)
                self.params.append(linear.weight)
                self.handles.append(linear.weight.register_post_accumulate_grad_hook(self._square(name)))

    def _forward(self, name: str) -> Callable[..., None]:
        def fn(_module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            if self.needs.output_grads and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._grad(name))
            if not (self.needs.hessians or self.needs.layer_hessians) or name in self.aliases:
                return
            ref, first = self.seen.get(id(x), (None, None))
            if ref is not None and ref() is x and first != name:
                self.aliases[name] = first
                return
            self.seen[id(x)] = (weakref.ref(x), name)
            x = x.detach().reshape(-1, x.shape[-1])
            if name not in self.grams:
                self.grams[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                self.counts[name] = 0
            if self.fp32_chunks:
                xf = x.to(torch.float32)
                self.grams[name] += (xf.T @ xf).to(torch.float64)
            else:
                xd = x.to(torch.float64)
                self.grams[name].addmm_(xd.T, xd)
            self.counts[name] += x.shape[0]
        return fn

    def _grad(self, name: str) -> Callable[[torch.Tensor], None]:
        def fn(g: torch.Tensor) -> None:
            g = g.detach().reshape(-1, g.shape[-1])
            if name not in self.gsums:
                self.gsums[name] = torch.zeros(g.shape[1], dtype=torch.float64, device=g.device)
                self.gcounts[name] = 0
            # the chunk's sum of squares in fp32 (no float64 copy of [tokens, out]), chunks summed in float64
            self.gsums[name] += torch.linalg.vector_norm(g.float(), dim=0).square().double()
            self.gcounts[name] += g.shape[0]
        return fn

    def _square(self, name: str) -> Callable[[torch.Tensor], None]:
        def fn(p: torch.Tensor) -> None:
            g = p.grad
            if not bool(torch.isfinite(g).all()):
                raise ValueError(f"calibration: non-finite gradient in layer {name!r} (chunk {self.chunks}); "
                                 "check the model and the calibration text")
            if name not in self.fisher:
                self.fisher[name] = torch.zeros(p.shape, dtype=torch.float32)
            self.fisher[name] += g.detach().float().pow(2).cpu()
            p.grad = None
        return fn

    def end_chunk(self) -> None:
        self.chunks += 1
        self.seen.clear()

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The block's statistics: ``<layer>/hessian`` (``H = Σ xᵀx / n``; aliases point at the first
        layer of a shared input), ``<layer>/output_grad`` (``mean (∂L/∂y)²``), ``<layer>/fisher``."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for p in self.params:
            p.requires_grad_(False)
        out: dict[str, torch.Tensor] = {}
        for name in names:
            if self.needs.hessians or self.needs.layer_hessians:
                if name not in self.aliases:
                    if not self.counts.get(name):
                        raise ValueError(f"no calibration activations reached {name!r} (is it used in forward?)")
                    out[f"{name}/hessian"] = self.grams.pop(name) / self.counts[name]
            if self.needs.output_grads:
                if not self.gcounts.get(name):
                    raise ValueError(f"quant.error=kfac: no gradient reached layer {name!r}")
                g = self.gsums.pop(name) / self.gcounts[name]
                if not bool(torch.isfinite(g).all()):
                    raise ValueError(f"quant.error=kfac: non-finite gradient in layer {name!r}; "
                                     "check the model and the calibration text")
                out[f"{name}/output_grad"] = g.cpu()
            if self.needs.fisher:
                f = self.fisher.pop(name, None)
                if f is None or not bool(f.any()):
                    raise ValueError(f"quant.error=fisher: no gradient reached layer {name!r}")
                out[f"{name}/fisher"] = f / self.chunks
        return out


# ------------------------------------------------------------------------------------ sweeps
class _Stop(Exception):
    """Raised by the hook that captures the first block's inputs (the rest of the forward is skipped)."""


def _first_block_inputs(layout: BlockLayout, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(hidden [B, T, d], keyword arguments)`` of the first block's call on token ids ``[B, T]``."""
    captured: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = kwargs
        raise _Stop

    handle = layout.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        layout.decoder(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise ValueError("block-wise calibration: the decoder never called its first block")
    return captured["hidden"], captured["kwargs"]


def _call(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _loss_gradient(layout: BlockLayout, hidden: torch.Tensor, ids: torch.Tensor, head_tokens: int) -> torch.Tensor:
    """``∂L/∂hidden [B, T, d]`` of the chunk's mean next-token NLL ``L`` from the last block's output:
    the final norm under autograd, the head's gradient in closed form
    (:func:`lowra.calibration.head_loss_gradient`, as the whole-model pass)."""
    x = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        normed = layout.norm(x)
    normed.backward(head_loss_gradient(layout.lm_head, normed.detach(), ids, head_tokens))
    return x.grad


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            if n in saved:
                p.requires_grad_(saved[n])
            p.grad = None


def blockwise_statistics(source: WeightSource, names: Sequence[str], calibration: Any, batch_size: int,
                         needs: CalibrationNeeds, store: StatStore, show: bool = True,
                         head_tokens: int = 128) -> BlockLayout:
    """Collect ``needs`` for target layers ``names`` block by block into ``store`` (one file per block).

    ``calibration``: int64 token windows ``[samples, seq_len]``, run in chunks of ``batch_size``.
    Returns the layout (``layout.targets[i]``: the layers whose statistics are in block file ``i``).
    """
    model = source.model
    layout = block_layout(model, names)
    chunks = calibration_batches(calibration, batch_size, needs.why or "calibration")
    was_training = model.training
    model.eval()
    try:
        with _frozen(model), large_allocations_mapped(), torch.no_grad():
            with source.materialized(layout.trunk), activity("calibration: embedding the windows", show):
                firsts = [_first_block_inputs(layout, ids.to(source.device)) for ids in chunks]
            kwargs = [kw for _, kw in firsts]
            hidden = [h for h, _ in firsts]
            del firsts
            if needs.gradients:
                _gradient_sweeps(source, layout, hidden, kwargs, chunks, needs, store, show, head_tokens)
            else:
                _forward_sweep(source, layout, hidden, kwargs, needs, store, show)
    finally:
        model.train(was_training)
    return layout


def _forward_sweep(source: WeightSource, layout: BlockLayout, hidden: list[torch.Tensor],
                   kwargs: list[dict[str, Any]], needs: CalibrationNeeds, store: StatStore, show: bool) -> None:
    """Forward-only statistics: every chunk through block i (Grams by hooks), block i's file written."""
    ticker = Ticker("calibration (block by block)", len(layout.layers) * len(hidden), show, unit="chunk")
    for i, layer in enumerate(layout.layers):
        with source.materialized([layout.prefixes[i]]):
            hooks = _BlockHooks(source.model, layer, layout.targets[i], needs, fp32_chunks=False)
            for c in range(len(hidden)):
                hidden[c] = _call(layer, hidden[c], kwargs[c])
                hooks.end_chunk()
                ticker.tick()
            store.put(i, hooks.tensors(layout.targets[i]), dict(hooks.aliases))


def _gradient_sweeps(source: WeightSource, layout: BlockLayout, hidden: list[torch.Tensor],
                     kwargs: list[dict[str, Any]], chunks: Sequence[torch.Tensor], needs: CalibrationNeeds,
                     store: StatStore, show: bool, head_tokens: int) -> None:
    """Forward sweep storing every boundary, the loss gradient at the last one, the backward sweep in reverse."""
    n, blocks, device = len(chunks), len(layout.layers), source.device
    shapes = [(h.shape, h.dtype) for h in hidden]
    for c in range(n):
        store.spill("h0000", c, hidden[c])
    hidden.clear()
    ticker = Ticker("calibration forward (block by block)", blocks * n, show, unit="chunk")
    for i, layer in enumerate(layout.layers):
        with source.materialized([layout.prefixes[i]]):
            for c in range(n):
                x = store.unspill(f"h{i:04d}", c, shapes[c], device, keep=True)
                store.spill(f"h{i + 1:04d}", c, _call(layer, x, kwargs[c]))
                ticker.tick()
    ticker = Ticker("calibration loss gradient (norm + LM head)", n, show, unit="chunk")
    with source.materialized(layout.head):
        for c in range(n):
            x = store.unspill(f"h{blocks:04d}", c, shapes[c], device)
            store.spill(f"g{blocks:04d}", c, _loss_gradient(layout, x, chunks[c].to(device), head_tokens))
            ticker.tick()
    ticker = Ticker("calibration backward (block by block)", blocks * n, show, unit="chunk")
    for i in reversed(range(blocks)):
        layer = layout.layers[i]
        with source.materialized([layout.prefixes[i]]):
            hooks = _BlockHooks(source.model, layer, layout.targets[i], needs, fp32_chunks=True)
            for c in range(n):
                x = store.unspill(f"h{i:04d}", c, shapes[c], device).requires_grad_(True)
                g = store.unspill(f"g{i + 1:04d}", c, shapes[c], device)
                with torch.enable_grad():
                    _call(layer, x, kwargs[c]).backward(g)
                hooks.end_chunk()
                if i > 0:
                    store.spill(f"g{i:04d}", c, x.grad)
                del x, g
                ticker.tick()
            store.put(i, hooks.tensors(layout.targets[i]), dict(hooks.aliases))
