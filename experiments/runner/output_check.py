"""A bad output directory (read-only, full, not a directory) ends in one ``error:`` line and exit
code 1, before any work: :func:`check_writable` (the evaluation's results file, the runner's run or
sweep directory through the Hydra callback :class:`WritableOutput`), and :func:`output_error` for a
write that fails later (a disk filling up during the run)."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

#: errno values that mean "this output cannot be written" (not a bug to show a traceback for)
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST,
                 errno.EISDIR}


def check_writable(directory: str | os.PathLike, what: str) -> Path:
    """Create ``directory`` (parents too) and write + remove a one-byte probe file in it.

    Raises:
        SystemExit: ``error: cannot write <what> in <directory>: <reason>`` (exit code 1).
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".lowra-write-probe-", dir=directory)
        try:
            os.write(fd, b"\0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise SystemExit(f"error: cannot write {what} in {directory}: {exc.strerror or exc}") from None
    return directory


def output_error(exc: OSError, what: str) -> SystemExit | None:
    """``SystemExit("error: …")`` for an OSError that says the output cannot be written, else None."""
    if exc.errno not in OUTPUT_ERRNOS:
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    return SystemExit(f"error: cannot write {what}{where}: {exc.strerror or exc}")


class WritableOutput(Callback):
    """Hydra callback (conf/run.yaml): the run (or sweep) directory must be writable before Hydra writes
    its own files there; otherwise one ``error:`` line, exit code 1, no traceback."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        check_writable(config.hydra.run.dir, "the run (hydra.run.dir)")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        check_writable(config.hydra.sweep.dir, "the sweep (hydra.sweep.dir)")
