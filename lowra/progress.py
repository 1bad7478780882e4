"""Progress of the quantization stages: a tqdm bar on a terminal, plain log lines otherwise.

A stage of ``quantize_model`` (calibration chunks, codebooks per layer, quantize + init per layer) can
run for minutes on a real model. On a terminal it draws a tqdm bar; in a log file (a Hydra run, a batch
job) a bar would be a line per redraw, and no bar at all left SmolLM2 silent for 45 minutes (issue 32).
So off a terminal :func:`progress` logs plain lines on the ``lowra`` logger
(``codebooks: 40/210 layers · 12.3 s, ~52 s left``): at the start, at least every
:data:`PLAIN_INTERVAL_S` seconds (checked after each item) and at the end.

A line after each item cannot bound the silence when one item (an LM-head pass, a stage-1 ILP, a
k-means) runs long, so every stage also opens an :func:`activity`: while one is open and nothing
has been logged for :data:`HEARTBEAT_S` seconds, a daemon thread logs
``<activity>: working · 23.4 s`` (issue 32: no stage silent for more than 10 s). Activities nest; an
inner one opened with ``enabled=None`` (the library's phases: plan stages, head passes) counts only
inside an enabled outer one, so the library stays quiet where its caller switched progress off.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

log = logging.getLogger("lowra")
T = TypeVar("T")

#: The longest gap between two plain progress lines (checked after each item).
PLAIN_INTERVAL_S = 4.0
#: While an activity is open, a heartbeat line after this many seconds without any log line.
HEARTBEAT_S = 8.0


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
    """Yield the items of ``iterable``, logging ``desc: n/total units · elapsed, ~eta left`` lines
    (and, inside an :func:`activity` named after the last line, heartbeats while an item runs long)."""
    t0 = last = time.perf_counter()
    of = f"/{total}" if total else ""
    log.info("%s: 0%s %ss", desc, of, unit)
    n = 0
    with activity(f"{desc}: 0{of} {unit}s", True) as act:
        for item in iterable:
            yield item
            n += 1
            act.desc = f"{desc}: {n}{of} {unit}s done"
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


# ------------------------------------------------------------------------------------ heartbeat
_now = time.perf_counter  # bound at import: the heartbeat's clock is not the one a test fakes


class Activity:
    """One open stage: ``desc`` (may be updated while it runs, e.g. ``"fine-tune: 12/100"``) and its start."""

    def __init__(self, desc: str) -> None:
        self.desc, self.t0 = desc, _now()


class _Heartbeat:
    """The open activities (innermost last), the time of the last log line, and the daemon thread
    that logs a heartbeat when an activity is open and the log has been silent for :data:`HEARTBEAT_S`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: list[Activity] = []
        self.last_line = _now()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        root = logging.getLogger()  # checked each time: a logging config (Hydra's) replaces root's handlers
        if not any(isinstance(h, _LastLine) for h in root.handlers):
            root.addHandler(_LastLine(self))
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self.run, name="lowra-progress-heartbeat", daemon=True)
            self.thread.start()

    def run(self) -> None:
        while True:
            time.sleep(0.25)
            with self.lock:
                now = _now()
                if not self.open or now - self.last_line < HEARTBEAT_S:
                    continue
                act = self.open[-1]
                self.last_line = now
            log.info("%s: working · %.1f s", act.desc, now - act.t0)


class _LastLine(logging.Handler):
    """A root-logger handler that only records when the last log line was written."""

    def __init__(self, beat: _Heartbeat) -> None:
        super().__init__(level=logging.NOTSET)
        self.beat = beat

    def emit(self, record: logging.LogRecord) -> None:
        self.beat.last_line = _now()


_HEARTBEAT = _Heartbeat()


def open_activity(desc: str) -> Activity:
    """Open an activity (see :func:`activity`); :func:`close_activity` ends it. For code whose stages
    are not one ``with`` block (the runner's stage bar)."""
    act = Activity(desc)
    with _HEARTBEAT.lock:
        _HEARTBEAT.start()
        if not _HEARTBEAT.open:
            _HEARTBEAT.last_line = _now()
        _HEARTBEAT.open.append(act)
    return act


def close_activity(act: Activity) -> None:
    """End ``act`` (and any activity opened inside it and left open)."""
    with _HEARTBEAT.lock:
        if act in _HEARTBEAT.open:
            del _HEARTBEAT.open[_HEARTBEAT.open.index(act):]


@contextmanager
def activity(desc: str, enabled: bool | None = None) -> Iterator[Activity]:
    """Within the block, the log is never silent for more than :data:`HEARTBEAT_S` seconds (plus a
    quarter second): a ``desc: working · elapsed`` line fills any such gap (off a terminal only;
    a tqdm bar shows its own elapsed time). ``enabled=None``: only inside an enabled outer activity
    (library phases follow their caller's progress switch); ``False``: nothing."""
    on = bool(_HEARTBEAT.open) if enabled is None else bool(enabled)
    if not on or _is_terminal():
        yield Activity(desc)
        return
    act = open_activity(desc)
    try:
        yield act
    finally:
        close_activity(act)
