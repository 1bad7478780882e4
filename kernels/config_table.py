"""Shipped Triton launch configs per GPU model: ``kernels/configs/<gpu>.json``.

The launchers never autotune at call time: a layer's launch plan (``lowra_kernels.lut_matmul``,
``lowra_kernels.dequantize``) takes each kernel's meta-parameters from this table, looked up once per
(GPU model, kernel, width, group size, M bucket, ``in_features``), and ``python -m lowra_kernels.tune``
is the only code that measures configs (it writes the table). A table file:

    {"device": "NVIDIA H200", "source": "...",
     "gemv": [{"in_features": 11008, "out_features": 4096, "bits": 2, "group": 64, "block_m": 1,
               "config": {"BLOCK_N": 128, "SPLIT_K": 8, "num_warps": 8, "num_stages": 2}, "us": 22.8}, ...],
     "dequantize": [{"in_features": 11008, "bits": 3, "group": 64,
                     "config": {"BLOCK_R": 16, "STEPS": 1, "num_warps": 4, "num_stages": 2}, "us": 107.6}, ...]}

Lookup: the entry of the same kernel, width, group size (and M bucket for the GEMV) whose
``in_features`` is nearest in ratio; ``None`` when the GPU has no table or no such entry (the
launcher then takes its default config and warns once, naming the tuning command).
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from lowra_kernels.dispatch import interpreting

CONFIG_DIR = Path(__file__).with_name("configs")
KERNELS = ("gemv", "dequantize")


def device_slug(device_name: str) -> str:
    """File stem of a GPU model's table: ``"NVIDIA H200"`` → ``"nvidia_h200"``."""
    return re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")


def table_path(device_name: str) -> Path:
    return CONFIG_DIR / f"{device_slug(device_name)}.json"


@functools.cache
def load_table(device_name: str) -> dict:
    """The table of ``device_name`` (``{}`` when none is shipped); a malformed file raises ``ValueError``."""
    path = table_path(device_name)
    if not path.is_file():
        return {}
    table = json.loads(path.read_text())
    for kernel in KERNELS:
        for entry in table.get(kernel, []):
            if not {"in_features", "bits", "group", "config"} <= set(entry):
                raise ValueError(f"{path}: a {kernel} entry lacks in_features/bits/group/config: {entry}")
    return table


def lookup(device_name: str, kernel: str, bits: int, group: int, in_features: int,
           block_m: int | None = None) -> dict | None:
    """The tuned config (meta-parameters, ``num_warps``, ``num_stages``) nearest to this call, or ``None``."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    best, best_dist = None, math.inf
    for entry in load_table(device_name).get(kernel, []):
        if entry["bits"] != bits or entry["group"] != group or entry.get("block_m") != block_m:
            continue
        dist = abs(math.log(entry["in_features"] / in_features))
        if dist < best_dist:
            best, best_dist = entry, dist
    return None if best is None else dict(best["config"])


def config_meta(config: Any) -> dict:
    """A ``triton.Config`` as launch keywords: meta-parameters, ``num_warps``, ``num_stages`` (``maxnreg``)."""
    meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    if config.maxnreg is not None:
        meta["maxnreg"] = config.maxnreg
    return meta


def device_name(t: torch.Tensor) -> str:
    """The GPU model the tables are keyed by (``""`` under the Triton interpreter or off a GPU)."""
    return torch.cuda.get_device_name(t.device) if t.is_cuda and not interpreting() else ""
