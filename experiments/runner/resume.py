"""Resume bookkeeping of a run directory: the stored config, finished runs, wall time across kills.

``resume=true`` continues a run only with the configuration it was started with; without it, a
directory that holds a started or finished run is refused (``RunDirectoryInUseError``, naming
``resume=true``, a new ``hydra.run.dir`` and ``restart=true``), so a re-run never discards work unasked. The first start
stores the resolved config in ``<run_dir>/run_config.json``; a resume compares every field that
can change the results (everything except :data:`NEUTRAL_KEYS`: logging, progress display,
checkpoint interval, evaluation batch size, whether the model is saved) and refuses a mismatch
with a :class:`ResumeMismatchError` that lists each differing key with its stored and new value.
``resume_override=true`` continues anyway (the differences are logged and recorded in
``state.json`` as ``resume_overrides``; the new config becomes the stored one).

A run whose ``results.json`` was written is finished: resuming it reports it as finished and
returns the stored results — nothing is re-evaluated and nothing is rewritten.

Wall time: every start of the runner in a directory is a *session* recorded in ``state.json``
(``{"start", "last", "end"}``, Unix seconds). A session killed without a chance to clean up
(SIGKILL, power loss) has no ``end``; the next session closes it at its last sign of life — the
later of its last state write and the last training checkpoint written during it — so
``wall_time_s`` counts the time before a kill up to the last checkpoint.

A run that raises writes ``failed.json`` (:func:`mark_failed`: the error, the stage, whether
``resume=true`` can continue it). When nothing resumable exists yet (no quantized model, no
training checkpoint) the half-made outputs — ``state.json``, ``run_config.json``,
``quant_report.json``, ``checkpoint/`` — are removed, so the directory holds only Hydra's files
and ``failed.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from experiments.runner.config_check import ConfigError
from experiments.runner.logging_utils import atomic_write_json

log = logging.getLogger("experiments.run")

CONFIG_FILE = "run_config.json"
STATE_FILE = "state.json"
RESULTS_FILE = "results.json"
FAILED_FILE = "failed.json"
#: Config keys (dotted; a key covers everything below it) that do not change any result.
NEUTRAL_KEYS = (
    "resume", "resume_override", "restart", "progress", "save_model", "logger", "train.checkpoint_every",
    "eval.batch_size",
    # the same global batch on 1 or N processes is the same run (up to float reduction order)
    "train.strategy", "train.dist_timeout_s", "train.fsdp_shard_base",
    # memory options: the same numbers up to float reduction order (an OOM-killed run resumes with them on)
    "model.gradient_checkpointing", "model.loss_chunk_tokens",
    # `+bits=B` is read through quant.bits, which is compared
    "bits",
)


class ResumeMismatchError(ConfigError):
    """``resume=true`` with a configuration that differs from the stored one in result-changing keys."""


class RunDirectoryInUseError(ConfigError):
    """A new run (no ``resume=true``) in a directory that holds a started or finished run, without ``restart=true``."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` → ``{"a.b": 1, "c": [1, 2]}`` (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _neutral(key: str) -> bool:
    return any(key == n or key.startswith(n + ".") for n in NEUTRAL_KEYS)


def result_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened config fields that can change a run's results."""
    return {k: v for k, v in flatten(config).items() if not _neutral(k)}


_MISSING = "<absent>"


def config_diff(stored: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(key, stored value, new value)]`` of the result-changing fields that differ, sorted by key."""
    a, b = result_fields(stored), result_fields(new)
    diff = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va != vb and not (_is_number(va) and _is_number(vb) and float(va) == float(vb)):
            diff.append((key, va, vb))
    return diff


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def format_diff(diff: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k}: {json.dumps(a, default=str)} (stored) → {json.dumps(b, default=str)} (now)"
                     for k, a, b in diff)


class RunState:
    """Finished stages, their outputs and the sessions, persisted atomically in ``<run_dir>/state.json``."""

    def __init__(self, run_dir: Path, resume: bool) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STATE_FILE
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if resume and self.path.exists() else {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def set(self, **values: Any) -> None:
        self.data.update(values)
        sessions = self.data.get("sessions")
        if sessions and sessions[-1].get("end") is None:
            sessions[-1]["last"] = time.time()
        atomic_write_json(self.path, self.data)

    # ----------------------------------------------------------------------- wall time
    def start_session(self, checkpoint: Path | None = None) -> None:
        """Close a previous session that was killed (at its last sign of life) and open a new one."""
        sessions = self.data.setdefault("sessions", [])
        now = time.time()
        if sessions and sessions[-1].get("end") is None:
            s = sessions[-1]
            last = float(s.get("last", s["start"]))
            if checkpoint is not None and checkpoint.exists():
                mtime = checkpoint.stat().st_mtime
                if s["start"] <= mtime <= now:
                    last = max(last, mtime)
            s["end"], s["killed"] = last, True
        sessions.append({"start": now, "last": now, "end": None})
        self.set()

    def end_session(self) -> None:
        sessions = self.data.get("sessions")
        if sessions and sessions[-1].get("end") is None:
            sessions[-1]["end"] = time.time()
            self.set()

    def wall_time_s(self) -> float:
        """Seconds over all sessions; the open one counts until now."""
        now = time.time()
        return sum((s["end"] if s.get("end") is not None else now) - s["start"] for s in self.data.get("sessions", []))


def check_resume(run_dir: Path, config: dict[str, Any], resume: bool, override: bool,
                 restart: bool = False) -> dict[str, Any] | None:
    """Compare ``config`` with the stored one before anything of the run directory is touched.

    Returns the stored results when the run is finished (``resume=true`` and ``results.json``
    exists), else None.
    Raises:
        ResumeMismatchError: ``resume=true``, a result-changing key differs from the stored config
            (or no config was stored although the directory holds a started run) and no override.
        RunDirectoryInUseError: neither ``resume=true`` nor ``restart=true``, and the directory holds a
            started or finished run (its state, results or checkpoints): starting over would discard
            them, which is never done unasked.
    """
    run_dir = Path(run_dir)
    if not resume:
        held = [name for name in (STATE_FILE, RESULTS_FILE, "checkpoint", "model") if (run_dir / name).exists()]
        if held and not restart:
            what = "a finished run" if (run_dir / RESULTS_FILE).exists() else "a started run"
            raise RunDirectoryInUseError(
                f"{run_dir} holds {what} ({', '.join(held)}): add resume=true to continue it (a finished run is "
                "reported, nothing is redone), use a new run directory (hydra.run.dir=…), or add restart=true to "
                "discard it and start over")
        return None
    stored_path, state_path, results_path = run_dir / CONFIG_FILE, run_dir / STATE_FILE, run_dir / RESULTS_FILE
    if stored_path.exists():
        diff = config_diff(json.loads(stored_path.read_text()), config)
        if diff and not override:
            raise ResumeMismatchError(
                f"resume=true in {run_dir}: the run was started with another configuration — "
                f"{format_diff(diff)}. Resuming would mix the two runs' numbers: use a new run directory "
                "(hydra.run.dir=…) or resume=false to start over, or add resume_override=true to continue anyway"
            )
        if diff:
            log.warning("resume_override=true: continuing with a different configuration: %s", format_diff(diff))
            _record_override(state_path, [k for k, _, _ in diff])
    elif state_path.exists() or results_path.exists():
        if not override:
            raise ResumeMismatchError(
                f"resume=true in {run_dir}: the directory holds a run without a stored configuration "
                f"({CONFIG_FILE}; written by an older LowRA), so it cannot be checked against this one; "
                "add resume_override=true to continue anyway"
            )
        log.warning("resume_override=true: %s has no stored configuration; continuing unchecked", run_dir)
    if results_path.exists():
        return json.loads(results_path.read_text())
    return None


def _record_override(state_path: Path, keys: list[str]) -> None:
    if state_path.exists():
        data = json.loads(state_path.read_text())
        data["resume_overrides"] = sorted(set(data.get("resume_overrides", [])) | set(keys))
        atomic_write_json(state_path, data)


def store_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Write the resolved config a later ``resume=true`` is compared with."""
    atomic_write_json(Path(run_dir) / CONFIG_FILE, config)


def mark_failed(run_dir: Path, exc: BaseException, stage: str, state: RunState | None = None) -> Path:
    """Write ``<run_dir>/failed.json``; remove half-made outputs when nothing can be resumed."""
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoint"
    from lowra.checkpoint import is_checkpoint

    resumable = is_checkpoint(ckpt / "quantized") or (ckpt / "last.pt").exists()
    # an interrupted streaming quantization (lowra.quantize_pretrained) resumes from its finished blocks
    resumable = resumable or (ckpt / "quantized.partial" / "progress.json").exists()
    if not resumable:
        for name in (STATE_FILE, CONFIG_FILE, "quant_report.json"):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(ckpt, ignore_errors=True)
    interrupted = isinstance(exc, KeyboardInterrupt)
    info = {
        "status": "interrupted" if interrupted else "failed",
        "reason": f"{type(exc).__name__}: {exc}",
        "stage": stage.removeprefix("stages: ") or None,
        "resumable": resumable,
        "resume": (f"python -m experiments.run hydra.run.dir={run_dir} resume=true (with the same overrides)"
                   if resumable else None),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = run_dir / FAILED_FILE
    atomic_write_json(path, info)
    return path
