"""Issue 32, item 7: a read-only, full or impossible output directory ends the evaluation and the runner
in one ``error:`` line and exit code 1 (before any work where it can be seen at the start)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.eval.harness import default_output, main, output_name
from experiments.runner.config_check import REPO_ROOT
from experiments.runner.output_check import check_writable

#: a directory no process can create, root included (/sys refuses new entries: EPERM / EACCES)
UNWRITABLE = Path("/sys/lowra-test-output")
EVAL_SMALL = ["--fp", "--tasks", "none", "--window", "64", "--max-windows", "1", "--no-progress"]


def _unwritable() -> Path:
    try:
        UNWRITABLE.mkdir()
    except OSError:
        return UNWRITABLE
    UNWRITABLE.rmdir()
    pytest.skip("/sys accepts new entries here: no unwritable directory to test with")


def test_check_writable(tmp_path):
    made = check_writable(tmp_path / "a" / "b", "x")
    assert made == tmp_path / "a" / "b" and not list(made.iterdir())  # the probe is gone
    with pytest.raises(SystemExit, match=r"^error: cannot write the results in /sys/lowra-test-output/run: "):
        check_writable(_unwritable() / "run", "the results")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="error: cannot write x in .*file/run: "):
        check_writable(tmp_path / "file" / "run", "x")


def test_evaluate_output_is_named_by_model_method_bits_beside_the_checkpoint(tmp_path):
    info = {"name": "stories260K", "method": "lowra", "bits_nominal": 2.0}
    assert output_name(info) == "harness_stories260K_lowra_b2.00.json"
    beside = tmp_path / "run" / "harness_stories260K_lowra_b2.00.json"
    assert default_output(tmp_path / "run" / "model", info) == beside  # beside the checkpoint, not in the checkout
    dense = {"name": "stories260K", "method": "fp", "bits_nominal": None}
    assert output_name(dense) == "harness_stories260K_fp_fp.json"


def test_evaluate_refuses_a_read_only_output_before_loading(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*EVAL_SMALL, "--output", str(_unwritable() / "eval.json")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write the results in /sys/lowra-test-output"), err
    with pytest.raises(SystemExit) as exit_:
        main(EVAL_SMALL)  # no checkpoint to write beside: --output is required
    assert exit_.value.code == 2 and "--output FILE is required" in capsys.readouterr().err


def test_evaluate_on_a_disk_that_fills_up(tmp_path):
    """The results' write fails with ENOSPC after the evaluation (in a child process: the patch must not
    outlive the test): one error line, exit code 1, no file."""
    out = tmp_path / "eval.json"
    proc = _child(_FULL_DISK.format(module="experiments.eval.evaluate"), [*EVAL_SMALL, "--output", str(out)])
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: cannot write the results {out} ({out}): No space left on device"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_runner_refuses_a_read_only_run_directory():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "experiments.run", f"hydra.run.dir={_unwritable() / 'run'}",
                           "logger=none"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: cannot write the run (hydra.run.dir) in {UNWRITABLE / 'run'}: "
                     f"{lines[0].rsplit(': ', 1)[-1]}"], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


_FULL_DISK = """
import errno, runpy, sys
import lowra.atomic

def full(path, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))

lowra.atomic.atomic_path = full  # every atomic write fails as on a full disk
sys.argv = ["{module}", *sys.argv[1:]]
runpy.run_module("{module}", run_name="__main__", alter_sys=True)
"""


def _child(script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_runner_on_a_disk_that_fills_up(tmp_path):
    """Every atomic write fails with ENOSPC (the run's first is its config or state): one error line, exit 1."""
    run_dir = tmp_path / "run"
    proc = _child(_FULL_DISK.format(module="experiments.run"), [
        f"hydra.run.dir={run_dir}", "logger=none", "progress=false", "+bits=2", "train.max_steps=2",
        "train.seq_len=64", "eval.max_tokens=256"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write the run's outputs in {run_dir} ("), errors
    assert errors[0].endswith("No space left on device") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
