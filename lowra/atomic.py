"""Atomic file writes: a crash mid-write leaves the previous file intact.

Every writer goes through ``atomic_path``: it hands out a temporary name in the destination's
directory (same file system, so the final ``os.replace`` is atomic), fsyncs the finished file,
renames it over the destination, and removes the temporary file on any failure.

Permissions: ``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask; the
finished file is given the mode an ordinary ``open(path, "w")`` would create (``0666 & ~umask``,
e.g. 0644 under the usual umask 022) before it is renamed into place, so results and models are
readable by whoever could read a plainly written file. ``atomic_dir_mode`` gives directories
made with ``tempfile.mkdtemp`` (0700) the ``0777 & ~umask`` of ``os.mkdir``.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read from ``/proc`` where available, else set-and-restore under a lock)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a newly created regular file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a newly created directory: ``0o777 & ~umask``."""
    return 0o777 & ~current_umask()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed.

    The file that lands at ``path`` has the umask-respecting mode of a plainly created file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
