"""Progress display: tqdm bars on a terminal, plain periodic log lines otherwise.

A bar redraws itself with carriage returns and escape codes; written to a file (a Hydra log, a
batch job's output, ``| tee``) that turns into a line per update. When stderr is not a TTY,
:func:`progress_bar` returns a :class:`PlainProgress` instead: same calls as tqdm (``update``,
``set_postfix``, ``set_description``, ``close``), but it logs one readable line
(``fine-tune: 120/300 (40%) loss=2.41 · 35 s, ~52 s left``) at every 10 % of the total and at
least every ``interval`` seconds — a handful of lines per loop. Each bar (and each stage of the run's
stage bar) is also a :func:`lowra.progress.activity`, so a step or a stage that runs long is never
silent for more than :data:`lowra.progress.HEARTBEAT_S` seconds (issue 32).
"""

from __future__ import annotations

import logging
import sys
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from lowra.progress import close_activity, open_activity

log = logging.getLogger("experiments.runner.progress")
T = TypeVar("T")


def is_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default: stderr, where tqdm draws) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class PlainProgress:
    """A tqdm stand-in for non-terminal output: periodic ``logging`` lines, no control characters.

    Args:
        total: number of steps (None: unknown, lines at ``interval`` only).
        desc: what is counted.
        interval: the longest gap in seconds between two lines.
        announce: log every ``set_description`` (used for the run's stages).
    """

    def __init__(self, total: int | None = None, desc: str = "", initial: int = 0, interval: float = 30.0,
                 announce: bool = False, **_: Any) -> None:
        self.total, self.desc, self.n, self.interval, self.announce = total, desc, initial, interval, announce
        self.start_n = initial
        self.postfix = ""
        self.t0 = self.last_t = time.perf_counter()
        self.t_first: float | None = None  # end of this session's first item (warm-up: kernels, caches)
        self.last_decile = self._decile()
        self.closed = False
        self.activity = open_activity(self._where()) if type(self) is PlainProgress else None
        if self.activity is not None:  # a bar dropped without close() must not leave its heartbeat behind
            weakref.finalize(self, close_activity, self.activity)

    def _where(self) -> str:
        if self.announce:
            return self.desc
        of = f"/{self.total}" if self.total else ""
        return f"{self.desc}: {self.n}{of}"

    def _decile(self) -> int:
        return int(10 * self.n / self.total) if self.total else 0

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc
        if self.announce:
            log.info("%s (%.1f s elapsed)", desc, time.perf_counter() - self.t0)
            if self.activity is not None:  # a new stage: its own activity (and start time)
                close_activity(self.activity)
                self.activity = open_activity(desc)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.announce:  # stages: one line per set_description, not per update
            return
        if self.activity is not None:
            self.activity.desc = self._where()
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first, self.n_first = now, self.n
        decile = self._decile()
        if decile > self.last_decile or now - self.last_t >= self.interval:
            self.last_decile, self.last_t = decile, now
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.t0
        where = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        eta = ""
        # the rate of THIS session's items after its first (a resumed run starts at `initial`; its first
        # step also pays the warm-up, e.g. compiling the CPU kernels: ~60 s on 2 cores)
        done = self.n - self.n_first if self.t_first is not None else 0
        if self.total and done > 0 and self.n < self.total:
            eta = f", ~{(now - self.t_first) / done * (self.total - self.n):.0f} s left"
        post = f" {self.postfix}" if self.postfix else ""
        log.info("%s: %s%s · %.1f s%s", self.desc, where, post, elapsed, eta)

    def close(self) -> None:
        if not self.closed and not self.announce and self.total and self.n > self.start_n \
                and self.last_decile < 10 and self.n >= self.total:
            self._line(time.perf_counter())
        if self.activity is not None:
            close_activity(self.activity)
            self.activity = None
        self.closed = True

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Off(PlainProgress):
    """Progress switched off (``progress=false``): every call does nothing."""

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True


def progress_bar(total: int | None, desc: str, enabled: bool = True, announce: bool = False, **kwargs: Any) -> Any:
    """A tqdm bar on a terminal, a :class:`PlainProgress` otherwise, a no-op when not ``enabled``.

    ``kwargs`` go to tqdm (``initial``, ``position``, ``leave``, ``unit`` …); ``initial`` also to
    the plain form.
    """
    if not enabled:
        return _Off(total, desc, initial=kwargs.get("initial", 0))
    if is_terminal():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, **kwargs)
    return PlainProgress(total, desc, initial=kwargs.get("initial", 0), announce=announce)


def progress_iter(iterable: Iterable[T], desc: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """Iterate ``iterable`` with a progress display (see :func:`progress_bar`)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    bar = progress_bar(total, desc, enabled, leave=False)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


def quiet_library_bars() -> None:
    """Switch off the progress bars of transformers / huggingface_hub / datasets (non-terminal output)."""
    import contextlib

    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    with contextlib.suppress(ImportError):
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
