"""One interpreter-safe autotune helper for every kernel in ``kernels/``.

``@triton.autotune`` benchmarks each config on the device; under ``TRITON_INTERPRET=1`` there is no
device to benchmark on (and more than one config fails), so the helper keeps only ``configs[0]``
there — the first config of every kernel is therefore its small, interpreter-friendly one. On a
GPU the full config space is searched once per distinct key (shape, bit-width, M bucket), and the
winners are cached on disk per GPU and Triton version (``cache_results``, in Triton's cache
directory), so a later process does not re-tune. Every shipped config compiles for sm_90/sm_80
without spilling and to a distinct binary: ``python -m lowra_kernels.compile_check``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import triton

from lowra_kernels.dispatch import interpreting


def autotune(
    configs: Sequence[triton.Config],
    key: Sequence[str],
    **kwargs,
) -> Callable:
    """``triton.autotune`` that keeps a single config (the first) when interpreting.

    Args:
        configs: candidate configs; ``configs[0]`` is the one used by the interpreter.
        key: names of kernel arguments whose values select a tuned config (shapes, bits).
        **kwargs: passed on to ``triton.autotune`` (e.g. ``reset_to_zero``, ``restore_value``);
            ``cache_results`` defaults to True where the installed Triton has it.
    """
    configs = list(configs)
    if not configs:
        raise ValueError("autotune needs at least one config")
    if interpreting():
        configs = configs[:1]
        kwargs.pop("prune_configs_by", None)
    elif "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs.setdefault("cache_results", True)
    return triton.autotune(configs=configs, key=list(key), **kwargs)


def configs(
    space: Sequence[dict], num_warps: Sequence[int] = (4,), num_stages: Sequence[int] = (2,),
    maxnreg: int | None = None,
) -> list[triton.Config]:
    """Cartesian product of meta-parameter dicts × warps × stages, in order (first = first).

    ``maxnreg`` caps registers per thread (ptxas otherwise may pick a low count and spill a few
    bytes to local memory, as it does for some GEMV tiles).
    """
    return [
        triton.Config(dict(meta), num_warps=w, num_stages=s, maxnreg=maxnreg)
        for meta in space
        for w in num_warps
        for s in num_stages
    ]
