"""Multi-process training under ``torchrun``: ``train.strategy=single|ddp|fsdp2``.

``torchrun --nproc_per_node=N -m experiments.run ... train.strategy=ddp`` (or ``fsdp2``) starts N
copies of the runner. This module holds everything they need beyond the single-process path:

* **process group** (:func:`init_distributed`): from torchrun's environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``); NCCL on CUDA (one GPU per process,
  ``cuda:LOCAL_RANK``), gloo on CPU. Every collective has the timeout ``train.dist_timeout_s``,
  so a rank that dies or hangs ends the others with an error instead of a hang (torchrun itself
  also stops the remaining workers as soon as one exits with an error).
* **data** (:class:`RankBatches`): ``train.batch_size`` is the GLOBAL micro-batch; rank ``r`` of
  ``N`` takes rows ``[r·B/N, (r+1)·B/N)`` of every global micro-batch (a ValueError names the keys
  when ``B`` is not divisible by ``N``). The global batch, hence the run, is the same for any N:
  DDP/FSDP2 average the per-rank gradients, which equals the single-process gradient when every
  rank holds the same number of label tokens (always true for packed LM blocks; for padded
  summarization pairs it is the mean of per-rank means).
* **quantization** runs on every rank, seeded and deterministic; :func:`check_same_on_all_ranks`
  then compares a sha256 of every rank's quantized state (codes, codebooks, scales, adapters) and
  raises if any rank differs (nothing is broadcast: a mismatch is a bug to see, not to paper over).
* **wrapping** (:func:`wrap_for_training`): ``ddp`` → ``DistributedDataParallel`` (the adapters
  are the only trainable parameters, so only they are all-reduced); ``fsdp2`` →
  ``torch.distributed.fsdp.fully_shard`` on every transformer block and the root, after the
  quantized bases were turned into shardable parameters (:mod:`lowra.sharded`).
* **checkpoints**: gather-on-save. Parameters and optimizer state are gathered to full tensors
  (:func:`full_tensor`, :func:`full_optimizer_state`) and rank 0 alone writes them; on resume every
  rank reads rank 0's file and takes its own shard (:func:`shard_like`). The same files are read
  by a single process, and a single-process checkpoint resumes under N processes.
* **outputs**: rank 0 alone logs (W&B) and writes ``state.json``, ``results.json``, checkpoints
  and the saved model; other ranks keep their bookkeeping in a private scratch directory
  (:func:`scratch_dir`) that is removed at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from experiments.runner.config_check import ConfigError

log = logging.getLogger("experiments.runner.distributed")

STRATEGIES = ("single", "ddp", "fsdp2")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedConfigError(ConfigError):
    """A strategy that does not fit how the processes were started."""


@dataclass
class DistContext:
    """Where this process stands: ``strategy``, ``rank`` of ``world_size``, its ``device``."""

    strategy: str
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs and writes run outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.strategy != "single"

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a Python float over the ranks (the float itself with one process)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(strategy: str, device: torch.device, timeout_s: float = 600.0) -> DistContext:
    """The process group for ``strategy`` (a no-op ``single`` context without torchrun).

    Args:
        strategy: ``train.strategy``: ``single`` | ``ddp`` | ``fsdp2``.
        device: the configured device; on CUDA each process takes ``cuda:LOCAL_RANK``.
        timeout_s: ``train.dist_timeout_s``, the timeout of every collective.
    Raises:
        DistributedConfigError: an unknown strategy, ``single`` under a torchrun world of several
            processes, or ``ddp``/``fsdp2`` without torchrun's environment.
    """
    if strategy not in STRATEGIES:
        raise DistributedConfigError(f"train.strategy={strategy!r} is not one of {list(STRATEGIES)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "single":
        if world > 1:
            raise DistributedConfigError(
                f"train.strategy=single but torchrun started WORLD_SIZE={world} processes: set "
                "train.strategy=ddp or train.strategy=fsdp2 (or run without torchrun)")
        return DistContext("single", 0, 1, 0, device)
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise DistributedConfigError(
            f"train.strategy={strategy} needs torchrun's environment ({', '.join(missing)} unset): launch with "
            f"`torchrun --nproc_per_node=N -m experiments.run ... train.strategy={strategy}`")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=float(timeout_s))}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    log.info("rank %d of %d (%s, %s, device %s)", rank, world, strategy, backend, device)
    if rank != 0:  # one readable log: the other ranks report warnings and errors only
        logging.getLogger("experiments").setLevel(logging.WARNING)
    return DistContext(strategy, rank, world, local_rank, device)


@contextlib.contextmanager
def scratch_dir(ctx: DistContext, run_dir: Path) -> Iterator[Path]:
    """The directory this rank writes its bookkeeping to: ``run_dir`` on rank 0, else a private
    temporary copy of rank 0's ``state.json`` / ``run_config.json`` (removed on exit)."""
    if ctx.is_main:
        yield run_dir
        return
    own = Path(tempfile.mkdtemp(prefix=f"lowra-rank{ctx.rank}-"))
    try:
        for name in ("state.json", "run_config.json"):
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, own / name)
        yield own
    finally:
        shutil.rmtree(own, ignore_errors=True)


# ------------------------------------------------------------------------------------------- data


class RankBatches:
    """This rank's share of every GLOBAL micro-batch of ``batches`` (``LMBatches`` / ``PairBatches``).

    ``get(i)`` returns rows ``[rank·b, (rank+1)·b)`` of global micro-batch ``i`` with
    ``b = batch_size / world_size``: the N ranks together see exactly the single-process batches.
    """

    def __init__(self, batches: Any, rank: int, world_size: int) -> None:
        global_b = int(batches.batch_size)
        if global_b % world_size:
            raise ValueError(
                f"train.batch_size={global_b} (the global micro-batch) is not divisible by the world size "
                f"{world_size} (torchrun --nproc_per_node × nodes): every rank takes train.batch_size / world "
                "sequences; choose train.batch_size as a multiple of the world size")
        self.batches, self.rank, self.world_size = batches, rank, world_size
        self.batch_size = global_b // world_size

    @property
    def per_epoch(self) -> int:
        return self.batches.per_epoch

    def get(self, index: int) -> dict[str, torch.Tensor]:
        lo = self.rank * self.batch_size
        return {k: v[lo : lo + self.batch_size] for k, v in self.batches.get(index).items()}


# ----------------------------------------------------------------------------------- quantization


def quantized_state_digest(model: nn.Module) -> str:
    """sha256 over every LowRA layer's quantized base (codes, rows, codebooks, scales) and adapters."""
    from lowra.model_layers import lowra_layers

    h = hashlib.sha256()
    for name, m in lowra_layers(model):
        h.update(name.encode())
        tensors = dict(m.qweight.state_dict()) if m.is_quantized else {"dense": m.dense_weight}
        if m.rank:
            tensors.update(lora_A=m.lora_A, lora_B=m.lora_B)
        for key in sorted(tensors):
            t = tensors[key].detach().contiguous().cpu()
            h.update(key.encode())
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_same_on_all_ranks(ctx: DistContext, model: nn.Module) -> str:
    """Raise RuntimeError unless every rank quantized ``model`` to the same bytes; returns the digest."""
    digest = quantized_state_digest(model)
    if not ctx.distributed:
        return digest
    digests: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(digests, digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RuntimeError(
            f"the quantized model differs between ranks (ranks {differ} differ from rank 0): quantization "
            "must be deterministic for multi-process training (same seed, same data, same library versions)")
    return digest


# --------------------------------------------------------------------------------------- wrapping


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (items of every ``nn.ModuleList`` that hold LoRA layers): FSDP2 units."""
    from lowra.linear import LowRALinear

    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            blocks += [b for b in module if any(isinstance(m, LowRALinear) for m in b.modules())]
    return blocks


def wrap_for_training(model: nn.Module, ctx: DistContext, shard_base: bool = True) -> nn.Module:
    """The module ``train`` calls: ``model`` itself (single, fsdp2 — sharded in place) or a DDP wrapper.

    FSDP2 (``shard_base``): every quantized base first becomes a frozen ``ShardedQuantizedWeight``
    parameter (:mod:`lowra.sharded`) so that each rank stores 1/N of its packed codes, codebooks
    and scales; ``shard_base=False`` keeps the quantized bases replicated (adapters and dense
    frozen weights are sharded either way).
    """
    if ctx.strategy == "single":
        return model
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # buffers (frozen dense weights, rotary tables) are identical on every rank: no per-step sync
        import inspect

        sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel).parameters else {"broadcast_buffers": False})
        return DistributedDataParallel(model, device_ids=ids, **sync)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if shard_base:
        from lowra.sharded import make_bases_shardable

        make_bases_shardable(model, ctx.world_size)
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for block in block_modules(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reshard(model: nn.Module) -> list[nn.Module]:
    """Shard every FSDP2 unit of ``model`` again (they stay gathered after a forward, see
    ``wrap_for_training``) so its parameters are DTensors; returns the units (none without FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.reshard()
    return units


@contextlib.contextmanager
def gathered(model: nn.Module, ctx: DistContext) -> Iterator[nn.Module]:
    """Inside: ``model`` as a plain single-process model with full parameters (FSDP2), to save it.

    A collective (every rank must enter, in the same order). Every FSDP2 unit is resharded first,
    then each sharded parameter is replaced by its full tensor (``DTensor.full_tensor``; tied
    parameters stay tied) and each ``ShardableLowRALinear`` by a plain ``LowRALinear`` holding the
    gathered ``QuantizedTensor`` (``lowra.sharded.gather_quantized``); all is put back on exit.
    ``save_quantized`` / ``memory_report`` inside therefore see exactly what one process would.
    A no-op for ``single`` and ``ddp`` (parameters are replicated there).
    """
    if ctx.strategy != "fsdp2":
        yield model
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from lowra.linear import LowRALinear
    from lowra.sharded import ShardableLowRALinear, gather_quantized

    units = reshard(model)
    classes = [(m, type(m)) for m in units]
    swaps: list[tuple[nn.Module, str, nn.Parameter]] = []
    bases: list[tuple[nn.Module, nn.Parameter]] = []
    full: dict[int, nn.Parameter] = {}
    try:
        for module in model.modules():
            if isinstance(module, ShardableLowRALinear):
                p = module._parameters.pop("qweight_shards")
                bases.append((module, p))
                qt = gather_quantized(p)
                module.__class__ = LowRALinear
                module.qweight = qt  # the setter also builds the kernels' view
            for name, p in list(module._parameters.items()):
                if isinstance(p, DTensor):
                    if id(p) not in full:
                        full[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                    swaps.append((module, name, p))
                    module._parameters[name] = full[id(p)]
        for m, cls in classes:  # FSDPLlamaForCausalLM → LlamaForCausalLM (the class a save records)
            m.__class__ = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
        yield model
    finally:
        for m, cls in classes:
            m.__class__ = cls
        for module, name, p in swaps:
            module._parameters[name] = p
        for module, p in bases:
            for cached in ("_qweight", "_packed", "_op_weight"):
                module.__dict__.pop(cached, None)
            module.__class__ = ShardableLowRALinear
            module._parameters["qweight_shards"] = p


# ------------------------------------------------------------------------------------ checkpoints


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) DTensor, on CPU (a collective for a DTensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu()


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like``: this rank's shard (a DTensor) when ``like`` is a DTensor.

    No communication: every rank holds the full tensor (read from rank 0's checkpoint) and keeps
    its own piece, chunked exactly as FSDP2 chunks (``torch.chunk`` along dim 0).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)
    return full.to(like.device, like.dtype)


def full_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every DTensor gathered to a full CPU tensor (a collective)."""
    from torch.distributed.tensor import DTensor

    out = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        out["state"][idx] = {k: full_tensor(v) if isinstance(v, DTensor) else v for k, v in entry.items()}
    return out


def shard_optimizer_state(state: dict[str, Any], params: list[torch.Tensor]) -> dict[str, Any]:
    """The inverse of :func:`full_optimizer_state` for this rank's ``params`` (in optimizer order)."""
    from torch.distributed.tensor import DTensor

    out = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        p = params[int(idx)]
        out["state"][idx] = {
            k: shard_like(v, p) if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
            for k, v in entry.items()
        }
    return out
