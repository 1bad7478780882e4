"""Peak host and device memory of the stages of streaming quantization (``PeakMemory``).

Host peaks come from ``/proc/self/status`` (VmHWM, reset per stage through ``/proc/self/clear_refs``),
device peaks from ``torch.cuda.max_memory_allocated``; ``available_host_memory`` is what the
runner's ``quant.stream=auto`` compares the full-precision checkpoint with.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["PeakMemory", "available_host_memory", "current_rss", "peak_rss", "release_free_memory", "reset_peak_rss"]


def _read_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process in bytes (0 where ``/proc`` is unavailable)."""
    kb = _read_status_kb("VmRSS")
    return 0 if kb is None else kb * 1024


def peak_rss() -> int:
    """Peak resident set size since the last reset (VmHWM), in bytes."""
    kb = _read_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> bool:
    """Give the heap memory the process has freed back to the OS (``gc.collect`` + glibc's ``malloc_trim(0)``).

    glibc keeps freed blocks below its mmap threshold (raised up to 32 MB by earlier large frees) in the
    heap: after a SmolLM2 fine-tune step 1.6 GB of freed activations stayed resident and counted in every
    later stage's RSS; ``malloc_trim`` returned them (measured: 2.37 → 0.73 GB). False where there is no
    glibc (the call is then a no-op)."""
    import gc

    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs ``ldconfig``); None without glibc."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class PeakMemory:
    """Peak host RSS and peak CUDA memory of named stages.

    ``with peaks.stage("pass1"): ...`` (or ``peaks.begin("pass1")`` … ``peaks.end()``) records
    ``{time_s, rss_start_bytes, peak_rss_bytes, peak_device_bytes}`` under ``peaks.stages["pass1"]``
    (a stage entered again accumulates its time and keeps its largest peak). Host peaks come from
    VmHWM, reset at the start of each stage where the kernel allows it (``peak_resettable``;
    otherwise a stage's peak is the process peak so far). The reset also lowers what
    ``getrusage`` reports as the process peak, so ``process_peak_rss`` keeps the true maximum over
    the process's life (including before the first stage). Device peaks are
    ``torch.cuda.max_memory_allocated`` (None without CUDA).
    """

    def __init__(self, release: bool = False) -> None:
        """``release``: :func:`release_free_memory` at the start of each stage, so a stage's peak counts what
        it allocates, not what the allocator kept from the stages before (the runner sets it)."""
        self.release = release
        self.stages: dict[str, dict[str, Any]] = {}
        self.peak_resettable = True
        self.process_peak_rss = 0
        self._open: tuple[str, float] | None = None

    def begin(self, name: str) -> None:
        """Start stage ``name`` (ends a stage still open)."""
        if self._open is not None:
            self.end()
        self.process_peak_rss = max(self.process_peak_rss, peak_rss())
        if self.release:
            release_free_memory()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self.peak_resettable = reset_peak_rss() and self.peak_resettable
        entry = self.stages.setdefault(name, {"time_s": 0.0, "rss_start_bytes": current_rss(), "peak_rss_bytes": 0,
                                              "peak_device_bytes": None})
        entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], entry["rss_start_bytes"])
        self._open = (name, time.perf_counter())

    def end(self) -> None:
        """Close the open stage (no-op when none is open)."""
        if self._open is None:
            return
        name, t0 = self._open
        self._open = None
        entry = self.stages[name]
        entry["time_s"] += time.perf_counter() - t0
        peak = peak_rss()
        entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], peak)
        self.process_peak_rss = max(self.process_peak_rss, peak)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            dev = int(torch.cuda.max_memory_allocated())
            entry["peak_device_bytes"] = max(entry["peak_device_bytes"] or 0, dev)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        finally:
            self.end()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{peak_resettable, process_peak_rss_bytes, stages: {name: {...}}}``."""
        return {"peak_resettable": self.peak_resettable,
                "process_peak_rss_bytes": max(self.process_peak_rss, peak_rss()),
                "stages": {k: dict(v) for k, v in self.stages.items()}}


def available_host_memory() -> int:
    """Bytes of host memory available to a new allocation (``MemAvailable``; total RAM where unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
