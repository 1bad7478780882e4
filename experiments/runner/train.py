"""Fine-tuning loop for the LoRA adapters: AdamW (or paged 8-bit AdamW), warm-up + decay, accumulation, resumable.

Only the parameters passed in are trained (the adapters; the quantized base is frozen).
Data order is a pure function of ``(seed, epoch)``, so a run resumed from a checkpoint at
optimizer step ``s`` sees exactly the micro-batches an uninterrupted run would have seen after
``s``. Checkpoints (``<dir>/last.pt``: trained tensors, optimizer, scheduler, RNG states, loss
history, elapsed time) are written atomically (temporary file + ``os.replace``) every
``checkpoint_every`` steps and at the end.

``train_loss_final`` is the mean training loss of the last ``log_every`` optimizer steps.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experiments.runner.chunked_loss import model_loss
from experiments.runner.distill import DistillStats, distill_loss, distill_options
from experiments.runner.progress import progress_bar
from lowra.atomic import atomic_path

CHECKPOINT_NAME = "last.pt"

# Called as hook(step) after every optimizer step (after any checkpoint of that step). Tests
# append a hook that raises to simulate an interrupted run.
STEP_HOOKS: list[Callable[[int], None]] = []


# ------------------------------------------------------------------------------------------ batches


class LMBatches:
    """Packed language-modelling blocks ``[n_blocks, seq_len]`` served as micro-batches.

    Micro-batch ``k`` of epoch ``e`` holds the blocks ``perm_e[k·B:(k+1)·B]`` where ``perm_e`` is a
    permutation drawn from ``torch.Generator().manual_seed(seed · 1_000_003 + e)``; the last
    incomplete micro-batch of an epoch is dropped.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int) -> None:
        if blocks.shape[0] < batch_size:
            raise ValueError(f"{blocks.shape[0]} training blocks < train.batch_size={batch_size}")
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self._perm: tuple[int, torch.Tensor] | None = None

    @property
    def per_epoch(self) -> int:
        return self.blocks.shape[0] // self.batch_size

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.blocks.shape[0], generator=g))
        return self._perm[1]

    def get(self, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch number ``index`` counted from the start of training."""
        epoch, k = divmod(index, self.per_epoch)
        rows = self._order(epoch)[k * self.batch_size : (k + 1) * self.batch_size]
        ids = self.blocks[rows]
        return {"input_ids": ids, "labels": ids}


class PairBatches:
    """(source, target) summarization pairs tokenized on the fly (same ordering rule)."""

    def __init__(
        self, pairs: list[tuple[str, str]], tokenizer: Any, arch: str, batch_size: int, seed: int,
        source_length: int, target_length: int, prompt_template: str | None,
    ) -> None:
        if len(pairs) < batch_size:
            raise ValueError(f"{len(pairs)} training pairs < train.batch_size={batch_size}")
        self.pairs, self.tok, self.arch = pairs, tokenizer, arch
        self.batch_size, self.seed = batch_size, seed
        self.source_length, self.target_length, self.template = source_length, target_length, prompt_template
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token

    @property
    def per_epoch(self) -> int:
        return len(self.pairs) // self.batch_size

    def get(self, index: int) -> dict[str, torch.Tensor]:
        epoch, k = divmod(index, self.per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        rows = torch.randperm(len(self.pairs), generator=g)[k * self.batch_size : (k + 1) * self.batch_size]
        chunk = [self.pairs[int(i)] for i in rows]
        return self.collate(chunk)

    def collate(self, chunk: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        """Padded ``input_ids``/``attention_mask`` ``[B, T]`` and ``labels`` (-100 = ignored)."""
        sources, targets = [s for s, _ in chunk], [t for _, t in chunk]
        if self.arch == "seq2seq":
            enc = self.tok(sources, truncation=True, max_length=self.source_length, padding=True, return_tensors="pt")
            lab = self.tok(text_target=targets, truncation=True, max_length=self.target_length,
                           padding=True, return_tensors="pt")["input_ids"]
            lab[lab == self.tok.pad_token_id] = -100
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": lab}
        rows, labels = [], []
        for s, t in chunk:
            prompt = self.tok((self.template or "{source}").format(source=s), add_special_tokens=False)["input_ids"]
            target = self.tok(t, add_special_tokens=False)["input_ids"][: self.target_length - 1]
            target = target + [self.tok.eos_token_id]
            bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
            prompt = bos + prompt[: max(1, self.source_length - len(target) - len(bos))]
            rows.append(prompt + target)
            labels.append([-100] * len(prompt) + target)
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.tok.pad_token_id, dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, l_) in enumerate(zip(rows, labels, strict=True)):
            ids[i, : len(r)], lab[i, : len(l_)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(l_), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": lab}


# -------------------------------------------------------------------------------------- schedule


def total_steps(tcfg: Any, micro_per_epoch: int) -> int:
    """Optimizer steps of the run: ``max_steps``, else ``epochs`` × steps per epoch."""
    if tcfg.max_steps is not None:
        return int(tcfg.max_steps)
    return max(1, int(tcfg.epochs) * (micro_per_epoch // int(tcfg.grad_accum)))


def warmup_steps(tcfg: Any, total: int) -> int:
    if tcfg.warmup_steps is not None:
        return int(tcfg.warmup_steps)
    return int(math.ceil(float(tcfg.warmup_ratio) * total))


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based): linear warm-up, then decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.scheduler={kind!r} is not one of ['cosine', 'linear', 'constant']")


# --------------------------------------------------------------------------------------- optimizer


def resolve_optimizer(requested: str | None, method: str | None, device: torch.device | str) -> str:
    """The optimizer a run actually uses (recorded in results.json as ``optimizer``).

    ``requested`` is ``train.optimizer``: ``auto`` / None takes the method's
    (``lowra.methods.optimizer_for``: paged 8-bit AdamW for QLoRA on CUDA with bitsandbytes, else
    AdamW; a quant option unknown to ``lowra.methods`` gets AdamW); ``paged_adamw_8bit`` falls back
    to ``adamw`` (with a warning) when there is no CUDA device or bitsandbytes does not import.
    """
    from lowra.methods import METHODS, optimizer_for

    name = "auto" if requested is None else str(requested)
    if name == "auto":
        return optimizer_for(method, str(device)) if method in METHODS else "adamw"
    if name == "paged_adamw_8bit" and not _bnb_usable(device):
        import warnings

        warnings.warn("train.optimizer=paged_adamw_8bit needs CUDA and bitsandbytes; using adamw",
                      RuntimeWarning, stacklevel=2)
        return "adamw"
    return name


def _bnb_usable(device: torch.device | str) -> bool:
    if not str(device).startswith("cuda"):
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # any import failure means: not usable here
        return False
    return True


def param_groups(params: list[torch.nn.Parameter], lrs: list[float] | None, lr: float,
                 no_decay: list[bool] | None = None) -> list[Any]:
    """``params`` as they go to the optimizer: one list when every parameter takes ``lr`` (and the
    weight decay), else one group per distinct (learning rate, decay) in first-seen order: ``lrs[i]`` is
    the rate of ``params[i]``; ``no_decay[i]`` puts it in a group with ``weight_decay=0``."""
    if (lrs is None or all(x == lr for x in lrs)) and not any(no_decay or ()):
        return params
    lrs = lrs if lrs is not None else [lr] * len(params)
    flags = no_decay if no_decay is not None else [False] * len(params)
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for p, x, nd in zip(params, lrs, flags, strict=True):
        groups.setdefault((float(x), bool(nd)), []).append(p)
    return [{"params": ps, "lr": x, **({"weight_decay": 0.0} if nd else {})} for (x, nd), ps in groups.items()]


def make_optimizer(name: str, params: list[Any], tcfg: Any) -> torch.optim.Optimizer:
    """``adamw`` (``torch.optim.AdamW``) or ``paged_adamw_8bit`` (bitsandbytes, CUDA only); ``params``
    is a list of parameters or of groups (``param_groups``)."""
    kw = dict(lr=float(tcfg.lr), betas=tuple(tcfg.betas), eps=float(tcfg.eps), weight_decay=float(tcfg.weight_decay))
    if name == "adamw":
        return torch.optim.AdamW(params, **kw)
    if name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, **kw)
    raise ValueError(f"train.optimizer={name!r} is not one of ['auto', 'adamw', 'paged_adamw_8bit']")


# ------------------------------------------------------------------------------------- checkpoints


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through ``lowra.atomic.atomic_path`` (a crash keeps the previous checkpoint)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(ckpt_dir: Path) -> dict[str, Any] | None:
    path = ckpt_dir / CHECKPOINT_NAME
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


@dataclass
class TrainResult:
    """What the loop did: ``steps`` done in total, ``losses`` per optimizer step (all of them)."""

    steps: int
    loss_final: float | None
    time_s: float
    resumed_from: int
    losses: list[float] = field(default_factory=list)
    optimizer: str = "adamw"
    distill: dict[str, Any] | None = None  # train.distill: weight, temperature, the teacher's costs


@dataclass
class TrainOptions:
    """How :func:`train` runs: the ``train`` config and what the run adds to it (built once per run,
    :meth:`from_run_config`).

    Attributes:
        tcfg: the ``train`` config (lr, scheduler, grad_accum, checkpoint_every, …).
        device: where the micro-batches go.
        resume: continue from ``<ckpt_dir>/last.pt`` (when it exists).
        log_fn: called with ``({"train/loss", "train/lr"}, step)`` every ``log_every`` steps.
        progress: a bar on a terminal, plain periodic lines otherwise.
        optimizer: the resolved optimizer name (``resolve_optimizer``); None: ``tcfg.optimizer``
            (``auto`` → adamw).
        dist: an ``experiments.runner.distributed.DistContext`` under torchrun (None: one process). Then
            the model is the DDP wrapper or the FSDP2-sharded model, the batches this rank's share,
            the logged loss is the mean over ranks, and checkpoints are gathered to full tensors
            that rank 0 alone writes (every rank reads them back on resume).
        teacher: the frozen fp model of ``train.distill`` (:mod:`experiments.runner.distill`); with
            ``train.distill.weight > 0`` the loss mixes CE with the KL to it, else it is unused.
            Never trained, never in the optimizer or the checkpoint. ``teacher_stats``: its costs.
        param_lrs: learning rates of named parameters that do not take ``tcfg.lr`` (e.g. trainable
            codebooks, ``train.codebook_lr``); the schedule multiplies every group alike.
        no_decay: names of parameters trained without weight decay (the trainable codebooks / scales:
            decay would pull the quantization levels to zero).
        loss_chunk_tokens: ``model.loss_chunk_tokens``: the LM head and the cross-entropy run over this
            many predicted tokens at a time (:mod:`experiments.runner.chunked_loss`; the full logits never
            exist); None: the model's own loss. One process only: under torchrun the wrapper's forward
            must run, so the model's own loss is used.
    """

    tcfg: Any
    device: torch.device | str = "cpu"
    resume: bool = False
    log_fn: Callable[[dict[str, float], int], None] | None = None
    progress: bool = True
    optimizer: str | None = None
    dist: Any = None
    teacher: torch.nn.Module | None = None
    teacher_stats: DistillStats | None = None
    param_lrs: dict[str, float] | None = None
    no_decay: frozenset[str] = frozenset()
    loss_chunk_tokens: int | None = None

    @classmethod
    def from_run_config(cls, cfg: Any, **run: Any) -> TrainOptions:
        """The options of a run config: ``cfg.train``, ``cfg.resume``, ``cfg.model.loss_chunk_tokens``;
        ``run``: the other fields (device, log_fn, teacher, …)."""
        return cls(tcfg=cfg.train, resume=bool(cfg.resume), loss_chunk_tokens=cfg.model.get("loss_chunk_tokens"),
                   **run)


@dataclass
class _Progress:
    """Where the loop stands: optimizer steps done, their losses, seconds of earlier sessions, this one's start."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    t0: float = 0.0


def train(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    batches: LMBatches | PairBatches,
    ckpt_dir: Path,
    options: TrainOptions,
) -> TrainResult:
    """Train ``params`` (name → parameter) of ``model`` for ``total_steps`` optimizer steps.

    Args:
        batches: micro-batch source; each micro-batch is ``{"input_ids": [B, T], "labels": [B, T], …}``.
        ckpt_dir: where ``last.pt`` lives; with ``options.resume`` the loop continues from it.
        options: the train config and how to run it (:class:`TrainOptions`).
    """
    tcfg = options.tcfg
    total = total_steps(tcfg, batches.per_epoch)
    warmup = warmup_steps(tcfg, total)
    named = list(params.items())
    optimizer = options.optimizer
    if optimizer is None:
        optimizer = resolve_optimizer(tcfg.get("optimizer", "adamw") if hasattr(tcfg, "get") else "adamw",
                                      None, options.device)
    opt = _optimizer(named, optimizer, options)
    weight, temperature, chunk = distill_options(tcfg)
    if weight > 0 and options.teacher is None:
        raise ValueError(f"train.distill.weight={weight} needs the teacher (the fp model); none was given")
    stats = options.teacher_stats if options.teacher_stats is not None else DistillStats()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total, tcfg.scheduler))
    torch.manual_seed(int(tcfg.seed))
    state = load_checkpoint(ckpt_dir) if options.resume else None
    done = _restore(state, named, opt, sched) if state is not None else _Progress()
    resumed_from = done.step

    def save() -> None:
        _save_checkpoint(ckpt_dir / CHECKPOINT_NAME, named, opt, sched, done, total, options.dist)

    done.t0 = time.perf_counter()
    model.train()
    bar = progress_bar(total, "fine-tune", options.progress, initial=done.step)  # a bar on a TTY, plain lines otherwise
    while done.step < total:
        step_loss, lr = _optimizer_step(model, batches, done.step, [p for _, p in named], opt, options,
                                        (weight, temperature, chunk, stats))
        sched.step()
        done.step += 1
        done.losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")  # before update: its line shows this step's loss
        bar.update(1)
        if options.log_fn is not None and (done.step % int(tcfg.log_every) == 0 or done.step == total):
            options.log_fn({"train/loss": step_loss, "train/lr": lr}, done.step)
        if done.step % int(tcfg.checkpoint_every) == 0 or done.step == total:
            save()
        for hook in STEP_HOOKS:
            hook(done.step)
    bar.close()
    done.elapsed += time.perf_counter() - done.t0
    model.eval()
    tail = done.losses[-int(tcfg.log_every) :]
    return TrainResult(
        steps=done.step, loss_final=(sum(tail) / len(tail)) if tail else None, time_s=done.elapsed,
        resumed_from=resumed_from, losses=done.losses, optimizer=optimizer,
        distill={"weight": weight, "temperature": temperature, "chunk_tokens": chunk, **stats.to_dict()}
        if weight > 0 else None,
    )


def _optimizer(named: list[tuple[str, torch.nn.Parameter]], name: str, options: TrainOptions,
               ) -> torch.optim.Optimizer:
    """The optimizer over ``named``: per-parameter learning rates and no-decay flags as groups."""
    tcfg = options.tcfg
    lrs = None if options.param_lrs is None else [float(options.param_lrs.get(n, tcfg.lr)) for n, _ in named]
    groups = param_groups([p for _, p in named], lrs, float(tcfg.lr), [n in options.no_decay for n, _ in named])
    return make_optimizer(name, groups, tcfg)


def _restore(state: dict[str, Any], named: list[tuple[str, torch.nn.Parameter]], opt: torch.optim.Optimizer,
             sched: Any) -> _Progress:
    """Parameters, optimizer, scheduler and RNG states back from a checkpoint; where it stood."""
    from experiments.runner import distributed as dist_mod

    with torch.no_grad():
        for name, p in named:
            p.copy_(dist_mod.shard_like(state["params"][name], p))
    opt.load_state_dict(dist_mod.shard_optimizer_state(state["optimizer"], [p for _, p in named]))
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if torch.cuda.is_available() and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return _Progress(step=state["step"], losses=list(state["losses"]), elapsed=float(state["elapsed_s"]))


def _save_checkpoint(path: Path, named: list[tuple[str, torch.nn.Parameter]], opt: torch.optim.Optimizer,
                     sched: Any, done: _Progress, total: int, dist: Any) -> None:
    """Gather-on-save: full tensors (a collective under FSDP2), written by rank 0 alone."""
    from experiments.runner import distributed as dist_mod

    params = {n: dist_mod.full_tensor(p) for n, p in named}
    opt_state = dist_mod.full_optimizer_state(opt.state_dict())
    if dist is not None and not dist.is_main:
        dist.barrier()  # rank 0 has written when this returns
        return
    atomic_torch_save(
        {
            "step": done.step, "total": total,
            "params": params,
            "optimizer": opt_state, "scheduler": sched.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "losses": done.losses, "elapsed_s": done.elapsed + (time.perf_counter() - done.t0),
        },
        path,
    )
    if dist is not None:
        dist.barrier()


def _optimizer_step(model: torch.nn.Module, batches: LMBatches | PairBatches, step: int,
                    trainable: list[torch.nn.Parameter], opt: torch.optim.Optimizer, options: TrainOptions,
                    distill: tuple[float, float, int, DistillStats]) -> tuple[float, float]:
    """One optimizer step over ``grad_accum`` micro-batches (the scheduler not stepped);
    ``(the step's loss, the learning rate it used)``."""
    tcfg, dist = options.tcfg, options.dist
    weight, temperature, chunk, stats = distill
    accum = int(tcfg.grad_accum)
    opt.zero_grad(set_to_none=True)
    step_loss = 0.0
    for micro in range(accum):
        batch = {k: v.to(options.device) for k, v in batches.get(step * accum + micro).items()}
        # DDP: all-reduce the gradients once per optimizer step, not per micro-batch
        no_sync = micro < accum - 1 and hasattr(model, "no_sync")
        with model.no_sync() if no_sync else contextlib.nullcontext():
            if weight > 0:
                loss, _ = distill_loss(model, options.teacher, batch, weight, temperature, chunk, stats)
            else:  # weight 0: the model's own loss (chunk by chunk with loss_chunk_tokens)
                loss = model_loss(model, batch, options.loss_chunk_tokens if dist is None else None)
            (loss / accum).backward()
        step_loss += float(loss.detach()) / accum
    if dist is not None:
        step_loss = dist.mean(step_loss)  # the loss of the global batch (equal shares per rank)
    if tcfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(trainable, float(tcfg.max_grad_norm))
    lr = opt.param_groups[0]["lr"]
    opt.step()
    return step_loss, lr
