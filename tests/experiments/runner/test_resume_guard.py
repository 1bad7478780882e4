"""Trustworthy runs (issue 18): resume refuses another config, finished runs are reported, wall time
survives a SIGKILL, a failed run is marked and leaves no half-made output, one readable summary."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir

import experiments.runner.run as run_module
from experiments.runner.config_check import CONF_DIR, REPO_ROOT, ConfigError, check_config
from experiments.runner.resume import (
    CONFIG_FILE,
    ResumeMismatchError,
    RunDirectoryInUseError,
    check_resume,
    config_diff,
    store_config,
)
from experiments.runner.run import run

SMALL = ["+bits=2", "train.max_steps=2", "train.batch_size=2", "train.seq_len=64", "eval.max_tokens=512",
         "eval.fp=false", "logger=none", "progress=false", "save_model=false", "train.checkpoint_every=1",
         "train.log_every=1"]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="run", overrides=overrides)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished small run: (run_dir, results, the log messages of the run)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    handler = _Records()
    logger = logging.getLogger("experiments")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        results = run(_compose(SMALL), run_dir)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return run_dir, results, handler.messages


# ------------------------------------------------------------------------------ config comparison
def test_config_diff_ignores_display_and_logging_keys():
    a = {"quant": {"bits": 2.0, "candidates": [1, 2, 4]}, "train": {"max_steps": 300, "checkpoint_every": 100},
         "logger": {"name": "wandb"}, "progress": True, "resume": False, "eval": {"batch_size": 8}, "seed": 0}
    b = json.loads(json.dumps(a))
    b.update(logger={"name": "none"}, progress=False, resume=True, resume_override=True)
    b["train"]["checkpoint_every"], b["eval"]["batch_size"], b["quant"]["bits"] = 10, 2, 2  # 2 == 2.0
    assert config_diff(a, b) == []
    b["quant"]["bits"], b["quant"]["candidates"], b["seed"] = 4.0, [1, 2, 3, 4], 1
    del b["train"]["max_steps"]
    assert [k for k, _, _ in config_diff(a, b)] == ["quant.bits", "quant.candidates", "seed", "train.max_steps"]


def test_check_resume_refuses_lists_and_can_be_overridden(tmp_path, caplog):
    stored = {"quant": {"bits": 2.0}, "seed": 0}
    store_config(tmp_path, stored)
    (tmp_path / "state.json").write_text("{}")
    assert check_resume(tmp_path, stored, resume=True, override=False) is None
    new = {"quant": {"bits": 4.0}, "seed": 0}
    with pytest.raises(ResumeMismatchError, match=r"quant\.bits: 2\.0 \(stored\) → 4\.0 \(now\).*resume_override=true"):
        check_resume(tmp_path, new, resume=True, override=False)
    # a fresh start in a directory holding a started run: refused unless restart=true (issue 32: a re-run
    # discarded the killed run's checkpoints and record and said nothing)
    with pytest.raises(RunDirectoryInUseError, match=r"holds a started run \(state\.json\).*resume=true.*"
                       r"hydra\.run\.dir.*restart=true"):
        check_resume(tmp_path, new, resume=False, override=False)
    assert check_resume(tmp_path, new, resume=False, override=False, restart=True) is None
    with caplog.at_level(logging.WARNING):
        assert check_resume(tmp_path, new, resume=True, override=True) is None
    assert "quant.bits" in caplog.text
    assert json.loads((tmp_path / "state.json").read_text())["resume_overrides"] == ["quant.bits"]
    (tmp_path / CONFIG_FILE).unlink()  # a run directory of an older version: nothing to compare with
    with pytest.raises(ResumeMismatchError, match="without a stored configuration"):
        check_resume(tmp_path, stored, resume=True, override=False)


# ---------------------------------------------------------------------------- finished runs
def test_one_readable_summary_and_no_losses_in_the_log(finished):
    run_dir, results, messages = finished
    assert len(results["train_losses"]) == 2
    summary = [m for m in messages if m.startswith("──── run finished")]
    assert len(summary) == 1
    for piece in ("perplexity", "(quantized)", "(init)", "(fine-tuned)", "nominal", "effective",
                  str(run_dir / "results.json")):
        assert piece in summary[0], piece
    assert not any("train_losses" in m or m.startswith("results: {") for m in messages)
    assert max(map(len, messages)) < 1500


def test_resuming_a_finished_run_reports_it_and_evaluates_nothing(finished, monkeypatch, caplog):
    run_dir, results, _ = finished
    before = (run_dir / "results.json").read_bytes()

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished run must not be re-loaded or re-evaluated")

    for name in ("evaluate", "load_model", "load_tokenizer", "train"):
        monkeypatch.setattr(run_module, name, forbidden)
    with caplog.at_level(logging.INFO, logger="experiments.run"):
        # display/logging keys may differ on resume
        again = run(_compose([*SMALL, "resume=true", "progress=true", "eval.batch_size=4"]), run_dir)
    assert again == json.loads(before) and again["ppl_finetuned"] == results["ppl_finetuned"]
    assert "already finished" in caplog.text
    assert (run_dir / "results.json").read_bytes() == before


@pytest.mark.parametrize(("extra", "keys"), [
    (["+bits=4"], ["quant.bits"]),  # the case: a 2-bit run resumed at 4 bits
    (["train.max_steps=3", "seed=1"], ["seed", "train.max_steps", "train.seed"]),
])
def test_resuming_with_another_config_is_refused(finished, extra, keys):
    run_dir, _, _ = finished
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    overrides = [o for o in SMALL if o.split("=")[0] not in {e.split("=")[0] for e in extra}] + extra
    with pytest.raises(ResumeMismatchError) as err:
        run(_compose([*overrides, "resume=true"]), run_dir)
    for key in keys:
        assert f"{key}: " in str(err.value)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before  # nothing touched
    # the explicit override is accepted; a finished run is still only reported
    r = run(_compose([*overrides, "resume=true", "resume_override=true"]), run_dir)
    assert r["bits_target"] == 2.0


# ------------------------------------------------------------------------- kill, then resume
KILL_SCRIPT = """
import os, signal, sys, time
import experiments.runner.train as t
def hook(step):
    if step == 1:
        time.sleep(3)
    if step == 3:
        os.kill(os.getpid(), signal.SIGKILL)
t.STEP_HOOKS.append(hook)
import runpy
sys.argv = ["experiments/run.py", *sys.argv[1:]]
runpy.run_module("experiments.run", run_name="__main__", alter_sys=True)  # as `python -m experiments.run`
"""


def test_wall_time_counts_the_session_killed_by_sigkill(tmp_path, monkeypatch):
    """Killed at step 3 (checkpoint at step 2, after a 3 s pause); the resumed run's wall time
    includes the killed session up to that checkpoint; a resume with another budget is refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir = tmp_path / "run"
    overrides = [o for o in SMALL if not o.startswith(("train.max_steps", "train.checkpoint_every"))]
    overrides += ["train.max_steps=4", "train.checkpoint_every=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *overrides, f"hydra.run.dir={run_dir}"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    state = json.loads((run_dir / "state.json").read_text())
    assert len(state["sessions"]) == 1 and state["sessions"][0]["end"] is None
    assert not (run_dir / "results.json").exists()

    kept = sorted(p.name for p in (run_dir / "checkpoint").iterdir())
    with pytest.raises(RunDirectoryInUseError, match="holds a started run"):  # the same command, no resume=true
        run(_compose(overrides), run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == kept  # nothing discarded
    assert len(json.loads((run_dir / "state.json").read_text())["sessions"]) == 1
    with pytest.raises(ResumeMismatchError, match=r"quant\.bits: 2(\.0)? \(stored\) → 3(\.0)? \(now\)"):
        run(_compose([*[o for o in overrides if o != "+bits=2"], "+bits=3", "resume=true"]), run_dir)
    t0 = time.time()
    r = run(_compose([*overrides, "resume=true"]), run_dir)
    this_session = time.time() - t0
    assert r["resumed_from_step"] == 2 and r["train_steps"] == 4
    assert r["wall_time_s"] > this_session + 2.5  # the killed session's ≥ 3 s are counted
    sessions = json.loads((run_dir / "state.json").read_text())["sessions"]
    assert sessions[0]["killed"] and sessions[0]["end"] - sessions[0]["start"] >= 3.0


# ------------------------------------------------------------------------------- failed runs
def test_a_run_failing_while_loading_leaves_only_a_failure_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    run_dir = tmp_path / "run"
    with pytest.raises(run_module.ModelUnavailableError):
        run(_compose([*SMALL, "logger=wandb", f"model.pretrained={empty}"]), run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["failed.json"]  # no state, no W&B run
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["status"] == "failed" and failed["stage"] == "load" and not failed["resumable"]
    assert failed["reason"].startswith("ModelUnavailableError")


def test_lora_refuses_a_budget_it_would_ignore():
    with pytest.raises(ConfigError, match=r"\+bits=2 has no effect with quant=lora"):
        check_config(_compose(["quant=lora", "+bits=2"]))
    check_config(_compose(["quant=lora"]))
    check_config(_compose(["quant=lora", "+bits=16"]))
    check_config(_compose(["quant=lora", "+bits=2"]), ignored_budget_ok=True)  # a sweep's dense reference
