"""Single vs DDP vs FSDP2 on the real stories260K: ``python -m experiments.bench.distributed_check``.

One quantized model (LowRA, ``--bits``, saved once with ``lowra.save_quantized``) is fine-tuned
for ``--steps`` optimizer steps with the same GLOBAL batch by one process and by ``--world``
processes (``torch.multiprocessing`` spawn, gloo on CPU) under ``ddp`` and ``fsdp2``. Every
strategy is also interrupted after half the steps and resumed from its checkpoint in fresh model
objects (in the same processes). Printed and written to ``results/bench/distributed_check.json``:

* the per-step losses and their largest relative difference to the single-process run, and the
  largest difference of the final adapters;
* the uninterrupted vs interrupted-and-resumed losses;
* the bytes of quantized base each rank stores (whole under single/DDP, 1/N under FSDP2);
* FSDP2's saved model (gather-on-save) reloaded by one process: the largest logit difference to
  the FSDP2 model's own logits on a fixed probe batch.

The tests in ``tests/experiments/runner/test_distributed.py`` assert on the same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

TRAIN = {
    "max_steps": 10, "epochs": 1, "batch_size": 4, "grad_accum": 1, "seq_len": 64, "optimizer": "adamw",
    "lr": 3.0e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1.0e-8, "max_grad_norm": 1.0,
    "scheduler": "cosine", "warmup_ratio": 0.0, "warmup_steps": 1, "seed": 0, "checkpoint_every": 5,
    "log_every": 1,
}
PROBE_ROWS = 2


def prepare(workdir: Path, bits: float = 2.0, seq_len: int = 64, loftq_iters: int = 1,
            overrides: tuple[str, ...] = ()) -> Path:
    """Quantize stories260K once (seeded) and save it with the packed training blocks into ``workdir``.

    ``overrides``: more runner config overrides (e.g. ``quant.error=sse``: no calibration pass).
    """
    from hydra import compose, initialize_config_dir
    from safetensors.torch import save_file

    from experiments.runner.config_check import CONF_DIR
    from experiments.runner.data import load_data, pack_blocks
    from experiments.runner.setup import (
        calibration_kwargs,
        load_model,
        load_tokenizer,
        needs_calibration,
        quantize_kwargs,
    )
    from lowra import quantize_model, save_quantized

    workdir.mkdir(parents=True, exist_ok=True)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("run", overrides=[f"+bits={bits}", f"quant.loftq_iters={loftq_iters}", "logger=none",
                                            *overrides])
    tokenizer = load_tokenizer(cfg.model)
    data = load_data(cfg.data, tokenizer, need_train=True)
    model = load_model(cfg.model, torch.device("cpu"))
    torch.manual_seed(0)
    kwargs = quantize_kwargs(cfg, False)
    if needs_calibration(cfg):
        kwargs.update(calibration_kwargs(cfg, data))
    quantize_model(model, **kwargs)
    save_quantized(model, str(workdir / "model"))
    save_file({"blocks": pack_blocks(data.train_ids, seq_len)[:512].contiguous()}, str(workdir / "blocks.safetensors"))
    return workdir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_strategy(strategy: str, world: int, workdir: Path, train: dict[str, Any] | None = None,
                 interrupt_at: int | None = None) -> dict[str, Any]:
    """Train with ``strategy`` on ``world`` processes (1: in this process); rank 0's record.

    ``interrupt_at``: then also train again from scratch, stop after that many steps, and resume
    from the checkpoint in new model objects (``resumed_losses`` in the record).
    """
    tag = f"{strategy}-{world}"
    args = (strategy, world, str(workdir), dict(train or TRAIN), interrupt_at, tag)
    if world == 1 and strategy == "single":
        _worker(0, *args, port=0)
    else:
        import torch.multiprocessing as mp

        mp.spawn(_worker, args=(*args, _free_port()), nprocs=world, join=True)
    return json.loads((workdir / f"{tag}.json").read_text())


def _worker(rank: int, strategy: str, world: int, workdir: str, train: dict[str, Any], interrupt_at: int | None,
            tag: str, port: int) -> None:
    import faulthandler

    from safetensors.torch import load_file, save_file

    from experiments.runner import train as train_module
    from experiments.runner.distributed import (
        RankBatches,
        check_same_on_all_ranks,
        full_tensor,
        gathered,
        init_distributed,
        reshard,
        wrap_for_training,
    )
    from experiments.runner.setup import trainable_parameters
    from lowra import load_quantized, save_quantized
    from lowra.sharded import quantized_resident_bytes

    faulthandler.enable(all_threads=True)  # a native crash in a rank prints every thread's Python stack
    torch.set_num_threads(1)
    if strategy != "single":
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = init_distributed(strategy, torch.device("cpu"), timeout_s=120)
    work = Path(workdir)
    tcfg = OmegaConf.create(train)
    blocks = load_file(str(work / "blocks.safetensors"))["blocks"]
    ckpt = work / f"ckpt-{tag}"
    probe = blocks[-PROBE_ROWS:]

    def fresh() -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
        model = load_quantized(str(work / "model"))
        check_same_on_all_ranks(ctx, model)
        whole = quantized_resident_bytes(model)
        tm = wrap_for_training(model, ctx)
        return model, tm, {"whole": whole, "resident": quantized_resident_bytes(model)}

    def batches() -> Any:
        b = train_module.LMBatches(blocks[: -PROBE_ROWS], int(tcfg.batch_size), int(tcfg.seed))
        return RankBatches(b, ctx.rank, ctx.world_size) if ctx.distributed else b

    dist_arg = ctx if ctx.distributed else None
    model, tm, base_bytes = fresh()
    t0 = time.perf_counter()
    res = train_module.train(tm, trainable_parameters(model), batches(), ckpt,
                             train_module.TrainOptions(tcfg, progress=False, dist=dist_arg))
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        logits = model(input_ids=probe).logits.float()
    reshard(model)  # FSDP2 keeps a unit gathered after its forward
    adapters = {n: full_tensor(p).float().contiguous() for n, p in trainable_parameters(model).items()}
    bytes_per_rank: list[Any] = [base_bytes]
    if ctx.distributed:
        import torch.distributed as dist

        bytes_per_rank = [None] * ctx.world_size
        dist.all_gather_object(bytes_per_rank, base_bytes)
    with gathered(model, ctx):
        if ctx.is_main:
            save_quantized(model, str(work / f"saved-{tag}"))
    resumed_losses = None
    if interrupt_at:  # the same run, stopped after `interrupt_at` steps and resumed in new objects
        class Stop(Exception):
            pass

        def stop(step: int) -> None:
            if step == interrupt_at:
                raise Stop

        ckpt_int = work / f"ckpt-{tag}-int"
        model, tm, _ = fresh()
        train_module.STEP_HOOKS.append(stop)
        try:
            train_module.train(tm, trainable_parameters(model), batches(), ckpt_int,
                               train_module.TrainOptions(tcfg, progress=False, dist=dist_arg))
        except Stop:
            pass
        finally:
            train_module.STEP_HOOKS.remove(stop)
        model, tm, _ = fresh()  # only the checkpoint carries the state over
        resumed = train_module.train(tm, trainable_parameters(model), batches(), ckpt_int,
                                     train_module.TrainOptions(tcfg, progress=False, resume=True, dist=dist_arg))
        assert resumed.resumed_from == interrupt_at
        resumed_losses = resumed.losses
    if ctx.is_main:
        save_file({"logits": logits.contiguous(), **{f"adapter.{n}": t for n, t in adapters.items()}},
                  str(work / f"{tag}.safetensors"))
        (work / f"{tag}.json").write_text(json.dumps({
            "strategy": strategy, "world_size": world, "losses": res.losses, "interrupt_at": interrupt_at,
            "resumed_losses": resumed_losses, "quantized_bytes_per_rank": bytes_per_rank, "train_s": train_s,
        }))
    ctx.barrier()
    ctx.shutdown()


def hang_worker(rank: int, world: int, port: int, timeout_s: float) -> None:
    """Rank 1 hangs (sleeps far past the timeout); rank 0 waits for it in a barrier and must fail
    with the process group's timeout error instead of hanging."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from experiments.runner.distributed import init_distributed

    ctx = init_distributed("ddp", torch.device("cpu"), timeout_s=timeout_s)
    if rank != 0:
        time.sleep(20 * timeout_s)
        return
    ctx.barrier()


def compare(workdir: Path, ref: str, other: str) -> dict[str, float]:
    """Largest relative loss difference, largest adapter and logit differences of two runs."""
    from safetensors.torch import load_file

    a, b = (json.loads((workdir / f"{t}.json").read_text()) for t in (ref, other))
    ta, tb = (load_file(str(workdir / f"{t}.safetensors")) for t in (ref, other))
    loss_rel = max(abs(x - y) / abs(x) for x, y in zip(a["losses"], b["losses"], strict=True))
    adapter = max(float((ta[k] - tb[k]).abs().max()) for k in ta if k.startswith("adapter."))
    scale = max(float(ta[k].abs().max()) for k in ta if k.startswith("adapter."))
    return {"loss_rel_max": loss_rel, "adapter_abs_max": adapter, "adapter_scale": scale,
            "logits_abs_max": float((ta["logits"] - tb["logits"]).abs().max())}


def reload_logits(workdir: Path, tag: str) -> float:
    """Largest |logit| difference: ``saved-<tag>`` loaded by this single process vs the run's own."""
    from safetensors.torch import load_file

    from lowra import load_quantized

    blocks = load_file(str(workdir / "blocks.safetensors"))["blocks"]
    model = load_quantized(str(workdir / f"saved-{tag}"))
    with torch.no_grad():
        logits = model(input_ids=blocks[-PROBE_ROWS:]).logits.float()
    return float((logits - load_file(str(workdir / f"{tag}.safetensors"))["logits"]).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="results/bench/distributed_check")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--bits", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.workdir)
    from lowra.checkpoint import is_checkpoint

    if not is_checkpoint(work / "model"):
        prepare(work, bits=args.bits)
    train = {**TRAIN, "max_steps": args.steps, "checkpoint_every": max(1, args.steps // 2)}
    half = args.steps // 2
    report: dict[str, Any] = {"world_size": args.world, "steps": args.steps, "bits": args.bits, "strategies": {},
                              "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, gloo"}
    print(f"{'strategy':8} {'loss rel max':>13} {'adapter max':>12} {'logits max':>11} {'resume rel':>11} "
          f"{'base bytes/rank':>18} {'reload logits':>14}")
    for strategy in ("single", "ddp", "fsdp2"):
        world = 1 if strategy == "single" else args.world
        tag = f"{strategy}-{world}"
        r = run_strategy(strategy, world, work, train, interrupt_at=half)
        cmp = compare(work, "single-1", tag)
        resume_rel = max(abs(x - y) / abs(x) for x, y in zip(r["losses"], r["resumed_losses"], strict=True))
        reload = reload_logits(work, tag)
        per_rank = [b["resident"] for b in r["quantized_bytes_per_rank"]]
        report["strategies"][strategy] = {
            **cmp, "resume_loss_rel_max": resume_rel, "reload_logits_abs_max": reload,
            "quantized_bytes_per_rank": per_rank, "quantized_bytes_whole": r["quantized_bytes_per_rank"][0]["whole"],
            "losses": r["losses"], "train_s": r["train_s"]}
        print(f"{strategy:8} {cmp['loss_rel_max']:13.2e} {cmp['adapter_abs_max']:12.2e} {cmp['logits_abs_max']:11.2e} "
              f"{resume_rel:11.2e} {str(per_rank):>18} {reload:14.2e}")
    out = Path("results/bench/distributed_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
