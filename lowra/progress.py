"""Progress of the quantization stages: a tqdm bar on a terminal, plain log lines otherwise.

A stage of ``quantize_model`` (calibration chunks, codebooks per layer, quantize + init per layer) can
run for minutes on a real model. On a terminal it draws a tqdm bar; in a log file (a Hydra run, a batch
job) a bar would be a line per redraw, and no bar at all left SmolLM2 silent for 45 minutes (issue 32).
So off a terminal :func:`progress` logs plain lines on the ``lowra`` logger
(``codebooks: 40/210 layers · 12.3 s, ~52 s left``): at the start, at least every
:data:`PLAIN_INTERVAL_S` seconds (checked after each item) and at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("lowra")
T = TypeVar("T")

#: The longest gap between two plain progress lines (checked after each item).
PLAIN_INTERVAL_S = 10.0


def _is_terminal() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def progress(iterable: Iterable[T], desc: str, enabled: bool, total: int | None = None,
             unit: str = "layer") -> Iterable[T]:
    """``iterable`` with progress: unchanged when not ``enabled``, a tqdm bar on a terminal, else
    :func:`plain_progress` lines."""
    if not enabled:
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if _is_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False)
    return plain_progress(iterable, desc, total, unit)


def plain_progress(iterable: Iterable[T], desc: str, total: int | None, unit: str) -> Iterator[T]:
    """Yield the items of ``iterable``, logging ``desc: n/total units · elapsed, ~eta left`` lines."""
    t0 = last = time.perf_counter()
    of = f"/{total}" if total else ""
    log.info("%s: 0%s %ss", desc, of, unit)
    n = 0
    for item in iterable:
        yield item
        n += 1
        now = time.perf_counter()
        if now - last >= PLAIN_INTERVAL_S or (total is not None and n == total):
            last = now
            eta = f", ~{(now - t0) / n * (total - n):.0f} s left" if total and n < total else ""
            log.info("%s: %d%s %ss · %.1f s%s", desc, n, of, unit, now - t0, eta)


class Ticker:
    """Progress of a loop that is not one iterable (nested loops, work done between items): ``tick()``
    after each unit of work; :func:`progress`'s output (a line at the start, at most every
    :data:`PLAIN_INTERVAL_S` seconds, at the end)."""

    def __init__(self, desc: str, total: int, enabled: bool, unit: str = "layer") -> None:
        self.items = iter(progress(range(total), desc, enabled, total=total, unit=unit))
        next(self.items, None)

    def tick(self) -> None:
        next(self.items, None)
