"""Calibration data for quantizers that need it (OPTQ, ModuLoRA's ``quant=modulora``).

``calibration_windows`` draws a few hundred random token windows from the training stream (GPTQ
uses 128 random 2048-token segments of C4; we draw from the fine-tuning data itself).
``collect_hessians`` runs them through the full-precision model with forward hooks on the target
linears and returns each layer's input Hessian ``H = XᵀX / n`` ``[in, in]`` in float64 (``n``: the
number of token positions seen, padding excluded), ready for ``optq_quantize(..., hessian=H)``.
``collect_fisher`` runs them forward AND backward through the LM loss and returns each target
weight's diagonal empirical Fisher ``F = mean over chunks of (∂L/∂W)²`` ``[out, in]`` (fp32), the
importance of LowRA's loss-aware error table (``quant.error=fisher``); it can collect the input
Hessians in the same pass (``hessians=True``), so one calibration stage feeds both the planner and
the calibrated adapter init.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

__all__ = ["calibration_batches", "calibration_windows", "collect_fisher", "collect_hessians", "head_loss_gradient",
           "head_nll_sum",
           "large_allocations_mapped", "plain_head", "sample_windows"]


def calibration_windows(stream: torch.Tensor, n_samples: int = 256, seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    """``n_samples`` random windows ``[n_samples, seq_len]`` (int64) of a 1-D token ``stream [N]``.

    Windows start at uniformly drawn offsets (a fixed-seed generator, so runs are reproducible)
    and may overlap. Raises ValueError when the stream is shorter than one window.
    """
    stream = torch.as_tensor(stream).reshape(-1).to(torch.int64)
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"need n_samples ≥ 1 and seq_len ≥ 1, got {n_samples}, {seq_len}")
    if stream.numel() < seq_len:
        raise ValueError(f"calibration stream has {stream.numel()} tokens, fewer than one window of {seq_len}")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, stream.numel() - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


#: ``sample_windows``' defaults: the runner's calibration recipe (conf/quant/lowra.yaml: 64 × 256 tokens).
SAMPLE_WINDOWS, SAMPLE_SEQ_LEN = 64, 256


@torch.no_grad()
def sample_windows(model: nn.Module, n_samples: int = SAMPLE_WINDOWS, seq_len: int = SAMPLE_SEQ_LEN, seed: int = 0,
                   batch_size: int = 16) -> torch.Tensor:
    """Calibration windows ``[n_samples, seq_len]`` (int64) sampled from the full-precision model itself.

    The library's default when a config needs calibration text and none is given (as LLM-QAT's
    data-free calibration: the model's own samples follow its training distribution): each window
    starts at the model's BOS token and continues by plain multinomial sampling (temperature 1,
    no top-k/top-p, end-of-sequence suppressed so every window is full), seeded (the global RNG is
    left as it was). Raises ValueError for a model without ``config.bos_token_id`` or ``generate``.
    """
    config = getattr(model, "config", None)
    bos = getattr(config, "bos_token_id", None)
    if bos is None or not hasattr(model, "generate"):
        raise ValueError(f"{type(model).__name__} has no BOS token / generate(): pass calibration= (int64 token "
                         "windows [samples, seq_len], e.g. lowra.calibration.calibration_windows of some text)")
    device = next(model.parameters()).device
    eos = getattr(config, "eos_token_id", None)
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        for start in range(0, n_samples, batch_size):
            n = min(batch_size, n_samples - start)
            ids = torch.full((n, 1), int(bos), dtype=torch.long, device=device)
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                 top_p=1.0, temperature=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                                 pad_token_id=eos if isinstance(eos, int) else bos, eos_token_id=eos)
            out.append(seq[:, :seq_len].cpu())
    return torch.cat(out).to(torch.int64)


def calibration_batches(calibration: Any, batch_size: int, wanted: str) -> tuple[torch.Tensor, ...]:
    """Check ``calibration`` (int64 token windows ``[samples, seq_len]``) and split it into chunks.

    ``wanted`` names what needs the data (``"quant.error=fisher"``, ``"method 'optq'"``) in the
    ValueError raised for missing windows, a wrong shape or dtype, or a bad ``batch_size``.
    """
    if calibration is None:
        raise ValueError(
            f"{wanted} needs calibration data: pass `calibration=` (int64 token windows [samples, seq_len], "
            "e.g. lowra.calibration.calibration_windows of the training stream)"
        )
    calibration = torch.as_tensor(calibration)
    if calibration.dim() == 1:
        calibration = calibration[None]
    if calibration.dim() != 2 or calibration.shape[0] == 0 or calibration.dtype.is_floating_point:
        raise ValueError(f"{wanted}: `calibration=` must be integer token windows [samples, seq_len], got "
                         f"{calibration.dtype} {tuple(calibration.shape)}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"calibration_batch_size must be a positive integer, got {batch_size!r}")
    return calibration.split(int(batch_size))


def _target_linears(model: nn.Module, target_modules: Any) -> list[tuple[str, nn.Linear]]:
    from lowra.model_layers import find_target_linears

    return find_target_linears(model, target_modules)


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    target_modules: str | list[str] | tuple[str, ...] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Input Hessians ``{layer name: float64 [in, in]}`` of the target linears of ``model``.

    Args:
        model: the full-precision model (its mode is restored afterwards; run in eval mode).
        batches: ``input_ids [B, T]`` tensors, or dicts of model inputs; with an
            ``attention_mask [B, T]`` only the unmasked positions count.
        target_modules: as ``lowra.model_layers.find_target_linears`` (None: the model type's defaults).
        device: where the inputs go (default: the model's first parameter's device).
    Returns:
        ``H = Σ xᵀx / n`` over every token position ``x [in]`` that reached the layer (float64,
        accumulated on the layer's device). Raises ValueError if no batch was given.
    """
    targets = _target_linears(model, target_modules)
    if device is None:
        device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, _output: Any) -> None:
            x = args[0].detach()
            mask = state["mask"]
            if mask is not None and mask.shape == x.shape[:-1]:
                x = x[mask.to(torch.bool)]
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                counts[name] = 0
            sums[name].addmm_(x.T, x)
            counts[name] += x.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in targets]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            if isinstance(batch, Mapping):
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                state["mask"] = inputs.get("attention_mask")
                model(**inputs)
            else:
                state["mask"] = None
                model(batch.to(device))
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not seen:
        raise ValueError("collect_hessians got no calibration batches")
    missing = [n for n, _ in targets if n not in sums]
    if missing:
        raise ValueError(f"no calibration activations reached {missing[:5]} (are they used in forward?)")
    return {n: sums[n] / max(counts[n], 1) for n, _ in targets}


def collect_fisher(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    target_modules: str | list[str] | tuple[str, ...] | None = None,
    hessians: bool = False,
    device: torch.device | str | None = None,
    output_grads: bool = False,
    diagonal: bool = True,
    head_tokens: int = 128,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | tuple[dict[str, torch.Tensor], ...]:
    """Diagonal empirical Fisher of every target weight (and optionally its input Hessian).

    Each batch ``input_ids [B, T]`` is one chunk: the causal-LM loss (mean over its predicted
    tokens) is back-propagated and ``(∂L/∂W)²`` accumulated; no parameter is updated and every
    ``requires_grad`` flag is restored.

    Memory (what bounds the pass; issue 12 asks ≤ 2× the fp32 model): each decoder layer is
    checkpointed (only its input is kept, the rest recomputed in backward, bit-identically); the LM
    head and loss run over slices of ``head_tokens`` positions, also checkpointed, so the
    ``[tokens, vocab]`` logits never exist whole; with ``diagonal=False`` nothing back-propagates to
    any weight (only activation gradients: ``G`` needs ``∂L/∂y``, not ``∂L/∂W``); with
    ``diagonal=True`` each weight gradient is squared into its accumulator as soon as autograd has
    produced it and then freed, so at most one layer's gradient is alive. Models whose decoder
    layers or plain LM head cannot be found (``_no_split_modules``, ``get_decoder``,
    ``get_output_embeddings``) run whole, as ``model(input_ids, labels)``.

    Args:
        model: a full-precision causal LM (HF ``labels=`` API); its mode is restored afterwards.
        batches: token chunks ``[B, T]`` (e.g. ``calibration_windows(...).split(4)``).
        target_modules: as ``lowra.model_layers.find_target_linears``.
        hessians: also return ``H = Σ xᵀx / n`` ``[in, in]`` float64 per target (forward hooks;
            layers that read the same input tensor, as q/k/v do, share one Gram object).
        device: where the inputs go (default: the model's first parameter's device).
        output_grads: also return ``G = mean over tokens of (∂L/∂y)²`` float64 ``[out]`` per target
            (the output factor of the Kronecker-factored Fisher ``G ⊗ H``; ``quant.error=kfac``).
        diagonal: accumulate the diagonal Fisher (False: ``fisher`` comes back empty and no weight
            gradient is computed, when only ``G``/``H`` are wanted).
        head_tokens: token positions per slice of the LM head and loss.
    Returns:
        ``(fisher {name: fp32 [out, in] on CPU}, hessians {name: float64 [in, in]} or {})``, and
        ``output_grads {name: float64 [out]}`` as a third item when requested.
    Raises:
        ValueError: no batch, or a non-finite gradient (naming the layer and the option).
    """
    targets = _target_linears(model, target_modules)
    if device is None:
        device = next(model.parameters()).device
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    stats = _FisherStatistics(targets, hessians, output_grads, diagonal)
    handles = stats.register_hooks()
    was_training = model.training
    model.eval()
    try:
        with _checkpointed(_decoder_layers(model)), large_allocations_mapped():
            for batch in batches:
                ids = torch.as_tensor(batch).to(device)
                if ids.dim() == 1:
                    ids = ids[None]
                if stats.dry:
                    _find_shared_inputs(model, ids[:1, :2], hessians)
                    stats.allocate(device)
                stats.backward = False
                with torch.enable_grad():
                    _causal_lm_backward(model, ids, head_tokens, leaf_inputs=not diagonal,
                                        before_backward=stats.entering_backward)
                stats.check_chunk()
                stats.chunk += 1
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
            p.grad = None
        model.train(was_training)
    return stats.results()


class _FisherStatistics:
    """The accumulators of :func:`collect_fisher` and the hooks that fill them.

    ``fisher {name: fp32 [out, in] on CPU}`` (squared weight gradients, summed over chunks),
    ``sums {name: float64 [in, in]}`` / ``counts`` (input Grams and their token counts, one per set
    of layers reading the same input tensor: ``alias`` maps the others to it), ``gsums {name:
    float64 [out]}`` / ``gcounts`` (squared output gradients). The first batch runs a dry forward
    (``dry``) in which the forward hooks only record which layers share an input; :meth:`allocate`
    then creates every Gram and output-gradient accumulator before the first real activation, so
    none sits between activations. ``backward`` is set while a checkpointed layer recomputes its
    forward (its activations are already counted); ``chunk`` numbers the batches.
    """

    def __init__(self, targets: list[tuple[str, nn.Linear]], hessians: bool, output_grads: bool,
                 diagonal: bool) -> None:
        self.targets, self.hessians, self.output_grads, self.diagonal = targets, hessians, output_grads, diagonal
        self.fisher = ({n: torch.zeros_like(m.weight, dtype=torch.float32, device="cpu") for n, m in targets}
                       if diagonal else {})
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.gsums: dict[str, torch.Tensor] = {}
        self.gcounts: dict[str, int] = {}
        # q/k/v (and gate/up) read the same input tensor: one Gram, shared (memory ÷ 2-3). A dry forward
        # over two tokens finds which layers share (identity through a weak reference, never a data
        # pointer: an activation nothing saves is freed at once and its memory reused by a later input),
        # so every accumulator is allocated before the first activation and none sits between them
        self.seen_inputs: dict[int, tuple[weakref.ref, str]] = {}
        self.alias: dict[str, str] = {}
        self.backward = False
        self.chunk = 0
        self.dry = True

    def entering_backward(self) -> None:
        self.backward = True

    def register_hooks(self) -> list[Any]:
        """Forward hooks on every target (Grams, output-gradient hooks) when needed, and with
        ``diagonal`` a post-accumulate hook on every target weight (which it makes require grad)."""
        handles = ([m.register_forward_hook(self._forward_hook(n)) for n, m in self.targets]
                   if self.hessians or self.output_grads else [])
        if self.diagonal:
            for name, m in self.targets:
                m.weight.requires_grad_(True)
                handles.append(m.weight.register_post_accumulate_grad_hook(self._square_into(name)))
        return handles

    def allocate(self, device: torch.device | str) -> None:
        """End the dry pass: zeroed Gram ``[in, in]`` (one per shared input) and output-gradient
        ``[out]`` accumulators, float64 on ``device``."""
        self.seen_inputs.clear()
        self.dry = False
        for name, m in self.targets:
            if self.hessians and name not in self.alias:
                self.sums[name] = torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device)
                self.counts[name] = 0
            if self.output_grads:
                self.gsums[name] = torch.zeros(m.out_features, dtype=torch.float64, device=device)
                self.gcounts[name] = 0

    def _grad_hook(self, name: str):
        def fn(g: torch.Tensor) -> None:  # the chunk's sum of squares in fp32, chunks summed in float64
            g = g.detach().reshape(-1, g.shape[-1])
            self.gsums[name] += torch.linalg.vector_norm(g.float(), dim=0).square().double()
            self.gcounts[name] += g.shape[0]
        return fn

    def _forward_hook(self, name: str):
        def fn(_module: nn.Module, args: tuple, output: Any) -> None:
            if self.backward:  # a checkpointed layer recomputing its forward: already counted
                return
            if self.dry:
                inp = args[0]
                ref, first = self.seen_inputs.get(id(inp), (None, None))
                if ref is not None and ref() is inp:
                    self.alias[name] = first
                else:
                    self.seen_inputs[id(inp)] = (weakref.ref(inp), name)
                return
            if self.output_grads and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._grad_hook(name))
            if self.hessians and name not in self.alias:
                # fp32 Gram per chunk (float64 matmuls cost 2-4× more and dominate the pass on a
                # CPU), accumulated across chunks in float64
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                self.sums[name] += (x.T @ x).to(torch.float64)
                self.counts[name] += x.shape[0]
        return fn

    def _square_into(self, name: str):
        def fn(p: torch.Tensor) -> None:
            g = p.grad
            if not bool(torch.isfinite(g).all()):
                raise ValueError(f"quant.error=fisher: non-finite gradient in layer {name!r} "
                                 f"(chunk {self.chunk}); check the model and the calibration text")
            self.fisher[name] += g.detach().float().pow(2).cpu()
            p.grad = None
        return fn

    def check_chunk(self) -> None:
        """After a chunk's backward: every weight gradient was consumed, every Gram got activations."""
        for name, m in self.targets:
            if self.diagonal and m.weight.grad is not None:  # the hook frees every gradient it saw
                raise RuntimeError(f"calibration: the gradient of {name!r} was not consumed")
            if self.hessians and name not in self.alias and not self.counts[name]:
                raise ValueError(f"no calibration activations reached {name!r} (is it used in forward?)")

    def results(self) -> tuple[dict[str, torch.Tensor], ...]:
        """The means over chunks (Fisher) and tokens (Grams, output gradients), as
        :func:`collect_fisher` returns them; refuses no batch, a layer no gradient reached, and a
        non-finite output gradient."""
        targets, fisher, gsums, gcounts = self.targets, self.fisher, self.gsums, self.gcounts
        chunks = self.chunk
        if not chunks:
            raise ValueError("quant.error=fisher needs calibration batches; got none")
        for name, f in fisher.items():
            if not bool(f.any()):
                raise ValueError(f"quant.error=fisher: no gradient reached layer {name!r}")
            f /= chunks
        hess: dict[str, torch.Tensor] = {}
        if self.hessians:
            for n in self.sums:
                self.sums[n] /= max(self.counts[n], 1)
            hess = {n: self.sums[self.alias.get(n, n)] for n, _ in targets}
        if self.output_grads:
            for n, _ in targets:
                if not gcounts[n]:
                    raise ValueError(f"quant.error=kfac: no gradient reached layer {n!r}")
                if not bool(torch.isfinite(gsums[n]).all()):
                    raise ValueError(f"quant.error=kfac: non-finite gradient in layer {n!r}; "
                                     "check the model and the calibration text")
            return fisher, hess, {n: (gsums[n] / max(gcounts[n], 1)).cpu() for n, _ in targets}
        return fisher, hess


@contextmanager
def large_allocations_mapped(threshold: int = 1 << 20) -> Iterator[None]:
    """Inside: glibc serves blocks ≥ ``threshold`` bytes by mmap, so a freed activation goes back to
    the OS instead of pinning heap pages between long-lived blocks (measured on SmolLM2: the
    pass's peak resident set minus its live tensors fell from ~0.6 GB to ~0.2 GB). Afterwards the
    threshold is 32 MiB, where glibc's adaptive threshold ends up anyway. No-op off glibc.
    """
    mallopt = _glibc_mallopt()
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(_M_MMAP_THRESHOLD, 32 << 20)


_M_MMAP_THRESHOLD = -3


@functools.cache
def _glibc_mallopt() -> Callable[[int, int], int] | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt if hasattr(libc, "mallopt") else None
    except OSError:
        return None


@torch.no_grad()
def _find_shared_inputs(model: nn.Module, ids: torch.Tensor, needed: bool) -> None:
    """Run ``ids`` (a couple of tokens) through ``model`` so the dry-mode hooks see who shares inputs."""
    if needed:
        no_cache = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
        model(input_ids=ids, **no_cache)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an HF model (classes named in ``_no_split_modules``), in order."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


@contextmanager
def _checkpointed(layers: list[nn.Module]) -> Iterator[None]:
    """Run each of ``layers`` under non-reentrant activation checkpointing while inside.

    Only a layer's inputs stay alive between forward and backward; the backward recomputes the
    layer with the same ops and shapes (bit-identical on a deterministic device, RNG state restored).
    Forward hooks fire again during that recompute: ``collect_fisher`` ignores them then.
    """
    originals = []
    for layer in layers:
        forward = layer.forward
        originals.append((layer, "forward" in vars(layer), forward))
        layer.forward = functools.partial(_checkpoint_call, forward)
    try:
        yield
    finally:
        for layer, had_own, forward in originals:
            if had_own:
                layer.forward = forward
            else:
                del layer.forward


def _checkpoint_call(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


_SCALED_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def plain_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(decoder, lm_head)`` when ``logits = lm_head(decoder(ids).last_hidden_state)`` exactly."""
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    config = getattr(model, "config", None)
    if get_decoder is None or get_head is None or config is None:
        return None
    if any(getattr(config, k, None) not in (None, 1, 1.0) for k in _SCALED_HEAD_KEYS):
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or decoder is model or not isinstance(head, nn.Linear):
        return None
    return decoder, head


def _causal_lm_backward(model: nn.Module, ids: torch.Tensor, head_tokens: int, leaf_inputs: bool,
                        before_backward: Callable[[], Any] = lambda: None) -> None:
    """Back-propagate the mean next-token cross-entropy of ``ids [B, T]`` (the HF ``labels=ids`` loss).

    With a plain head the decoder's output gradient comes from :func:`head_loss_gradient` (the head
    over slices of ``head_tokens`` positions, the cross-entropy gradient in closed form: one
    slice's logits exist at a time) and is pushed through the decoder. ``leaf_inputs``: make the
    input embeddings a leaf that requires grad, so activations carry gradients while no parameter
    does. Other models run whole: ``model(input_ids, labels=ids).loss.backward()``.
    ``before_backward`` is called when the forward is done (the hooks then ignore recomputations).
    """
    parts = plain_head(model)
    embed = model.get_input_embeddings() if leaf_inputs else None
    handle = None
    if embed is not None:
        handle = embed.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_())
    try:
        if parts is None:
            no_cache = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
            loss = model(input_ids=ids, labels=ids, **no_cache).loss
            before_backward()
            loss.backward()
            return
        decoder, head = parts
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        if handle is not None:
            handle.remove()
    grad = head_loss_gradient(head, hidden.detach(), ids, head_tokens)
    before_backward()
    hidden.backward(grad)


@torch.no_grad()
def head_loss_gradient(head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, head_tokens: int) -> torch.Tensor:
    """``∂L/∂hidden [B, T, d]`` of the mean next-token NLL ``L`` of ``ids [B, T]`` with logits
    ``head(hidden)`` (``hidden``: the final norm's output).

    Over slices of ``head_tokens`` predicted positions: ``∂L/∂logits = (softmax − onehot) / n``
    (autograd over the fp32 cross-entropy of the slice's logits only, so the values are the plain
    backward's), then ``@ W_head``: each slice's ``[head_tokens, vocab]`` logits are computed once
    and dropped, two head GEMMs per slice where a checkpointed autograd head needs three.
    """
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = ids[:, 1:].reshape(-1).to(flat.device)
    weight = head.weight.detach()
    grad_flat = torch.empty_like(flat)
    scale = torch.ones((), dtype=torch.float32, device=flat.device) / labels.numel()  # autograd's 1/n
    for start in range(0, labels.numel(), head_tokens):
        piece = slice(start, start + head_tokens)
        logits = head(flat[piece]).float().requires_grad_(True)  # a leaf: autograd below covers the loss only
        with torch.enable_grad():
            nll = nn.functional.cross_entropy(logits, labels[piece], reduction="sum")
        (grad_logits,) = torch.autograd.grad(nll, logits, grad_outputs=scale)  # (softmax − onehot) / n
        grad_flat[piece] = grad_logits.to(weight.dtype) @ weight
    grad = torch.zeros_like(hidden)
    grad[:, :-1] = grad_flat.view(grad.shape[0], grad.shape[1] - 1, grad.shape[2])
    return grad


def head_nll_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(head(hidden).float(), labels, reduction="sum")
