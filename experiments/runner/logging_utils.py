"""Run outputs: atomic JSON writes, environment versions, peak memory, and the W&B logger.

W&B runs offline unless the user sets ``WANDB_MODE`` (``logger.mode`` is only the fallback);
the files go to ``<run_dir>/wandb`` (``wandb sync`` them later). Runs of one Hydra sweep share
a W&B group (the sweep directory's name unless ``logger.group`` is set). A resumed run reuses
its W&B run id (``<run_dir>/wandb_id.txt``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from experiments.runner.config_check import REPO_ROOT
from lowra.atomic import write_text_atomic


def atomic_write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    """Versions of the interpreter and the libraries results depend on, plus the git commit."""
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "transformers", "triton", "datasets", "hydra-core", "wandb", "cvxpy", "highspy", "lowra"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["torch"] = torch.__version__  # with its build tag (+cpu, +cu130): the distribution's metadata may omit it
    out["cuda"] = torch.version.cuda
    out["git_commit"] = git_commit()
    return out


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated by torch on CUDA; peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def layer_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``q_proj`` (the last name component)."""
    return name.rsplit(".", 1)[-1]


def rows_by_layer_type(per_layer: dict[str, dict[int, int]]) -> dict[str, dict[int, int]]:
    """Rows per bit-width ``{bits: rows}`` of each layer, pooled by layer type (q_proj, …)."""
    out: dict[str, dict[int, int]] = defaultdict(dict)
    for name, hist in per_layer.items():
        pooled = out[layer_type(name)]
        for b, n in hist.items():
            pooled[int(b)] = pooled.get(int(b), 0) + int(n)
    return dict(out)


def _mean_bits(hist: dict[int, int]) -> float:
    rows = sum(hist.values())
    return sum(b * n for b, n in hist.items()) / rows if rows else float("nan")


class RunLogger:
    """No-op logger (``logger=none``); the W&B logger overrides every method."""

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Scalar metrics at a training step (or without one)."""

    def log_bit_allocation(self, per_layer: dict[str, dict[int, int]]) -> None:
        """Per layer type: a histogram of the rows' bit-widths and their mean; a per-layer table.

        Args:
            per_layer: layer name → ``{bits: number of rows stored at that width}``.
        """

    def log_results(self, results: dict[str, Any]) -> None:
        """The final results as summary values and a one-row table."""

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (``exit_code`` 1: the run failed)."""


class WandbLogger(RunLogger):
    """Weights & Biases run in ``<run_dir>/wandb`` (offline unless ``WANDB_MODE`` says otherwise)."""

    def __init__(self, cfg: Any, run_dir: Path, config: dict[str, Any], group: str | None, name: str) -> None:
        import wandb

        self.wandb = wandb
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        write_text_atomic(id_file, run_id + "\n")
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=group, name=name, id=run_id, resume="allow",
            dir=str(run_dir), config=config, tags=list(cfg.tags or []),
            mode=os.environ.get("WANDB_MODE") or cfg.mode,
        )
        self.run.define_metric("train/*", step_metric="train/step")

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        data = dict(metrics)
        if step is not None:
            data["train/step"] = step
        self.run.log(data)

    def log_bit_allocation(self, per_layer: dict[str, dict[int, int]]) -> None:
        data: dict[str, Any] = {}
        for kind, hist in rows_by_layer_type(per_layer).items():
            edges = [0.5, 1.5, 2.5, 3.5, 4.5]
            counts = [hist.get(b, 0) for b in (1, 2, 3, 4)]
            data[f"bits/{kind}/hist"] = self.wandb.Histogram(np_histogram=(counts, edges))
            data[f"bits/{kind}/mean"] = _mean_bits(hist)
        widths = (1, 2, 3, 4)  # every width a row can have (3 bits: quant.candidates=[1,2,3,4], OPTQ)
        table = self.wandb.Table(columns=["layer", "type", "rows", "mean_bits", *(f"rows_{b}b" for b in widths)])
        for name, hist in per_layer.items():
            table.add_data(name, layer_type(name), sum(hist.values()), _mean_bits(hist),
                           *(hist.get(b, 0) for b in widths))
        data["bits/per_layer"] = table
        self.run.log(data)

    def log_results(self, results: dict[str, Any]) -> None:
        flat = {k: v for k, v in results.items() if isinstance(v, int | float | str | bool) or v is None}
        for k, v in results.items():
            if isinstance(v, dict) and k.startswith("rouge"):
                flat.update({f"{k}/{m}": s for m, s in v.items()})
        self.run.summary.update(flat)
        table = self.wandb.Table(columns=list(flat), data=[list(flat.values())])
        self.run.log({"results": table})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


class LazyLogger(RunLogger):
    """Creates the real logger at the first call that logs something.

    A run that fails while loading (a missing model, no network) therefore leaves no W&B run
    behind; one that fails later closes its W&B run with exit code 1 (shown as failed).
    """

    def __init__(self, factory: Any) -> None:
        self._factory, self._logger = factory, None

    def _get(self) -> RunLogger:
        if self._logger is None:
            self._logger = self._factory()
        return self._logger

    @property
    def started(self) -> bool:
        return self._logger is not None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self._get().log(metrics, step)

    def log_bit_allocation(self, per_layer: dict[str, dict[int, int]]) -> None:
        self._get().log_bit_allocation(per_layer)

    def log_results(self, results: dict[str, Any]) -> None:
        self._get().log_results(results)

    def finish(self, exit_code: int = 0) -> None:
        if self._logger is not None:
            self._logger.finish(exit_code)


def make_logger(cfg: Any, run_dir: Path, config: dict[str, Any], group: str | None, name: str) -> RunLogger:
    if cfg.logger.name == "none" or os.environ.get("WANDB_MODE") == "disabled":
        return RunLogger()
    return LazyLogger(lambda: WandbLogger(cfg.logger, run_dir, config, group, name))
