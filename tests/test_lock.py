"""The committed lock is complete, hashed, and what ``make venv`` installed.

``requirements.txt`` (``make lock``: ``uv pip compile --generate-hashes`` of setup.cfg's ranges) must
pin every requirement of setup.cfg (``install_requires`` and the ``dev`` extra) with at least one sha256;
``requirements/gpu.lock`` is the same pins without torch and triton. In the environment ``make venv``
built (``.venv`` of this checkout, stamped ``.installed``), every locked package is installed at its
locked version.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCKS = REPO / "requirements"


def _name(spec: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~\[;]", spec.strip(), maxsplit=1)[0]).lower()


def _lock(path: Path) -> dict[str, tuple[str, int]]:
    """``{name: (version, number of hashes)}`` of a ``uv pip compile --generate-hashes`` file."""
    pins: dict[str, tuple[str, int]] = {}
    current = None
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", line)
        if m:
            current = _name(m.group(1))
            pins[current] = (m.group(2), 0)
        elif current and "--hash=sha256:" in line:
            version, n = pins[current]
            pins[current] = (version, n + 1)
    return pins


def _setup_requirements() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["dev"].splitlines()
    return [_name(line) for line in lines if line.strip() and not line.strip().startswith("#")]


def test_cpu_lock_pins_every_requirement_with_hashes():
    pins = _lock(REPO / "requirements.txt")
    missing = [r for r in _setup_requirements() if r not in pins]
    assert not missing, f"setup.cfg requirements missing from requirements.txt (run `make lock`): {missing}"
    unhashed = [n for n, (_, hashes) in pins.items() if hashes == 0]
    assert not unhashed, f"locked without a sha256: {unhashed}"
    assert pins["torch"][0] == "2.13.0+cpu"  # the local CPU wheel; a plain `torch` is a CUDA build


def test_gpu_lock_is_the_cpu_lock_without_torch_and_triton():
    cpu = {n: v for n, (v, _) in _lock(REPO / "requirements.txt").items() if n not in ("torch", "triton")}
    gpu = {n: v for n, (v, _) in _lock(LOCKS / "gpu.lock").items()}
    assert gpu == cpu


def test_the_environment_is_the_lock():
    venv = REPO / ".venv"
    if Path(sys.prefix).resolve() != venv.resolve() or not (venv / ".installed").exists():
        pytest.skip("not the .venv that `make venv` built from the lock")
    wrong = {}
    for name, (version, _) in _lock(REPO / "requirements.txt").items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != version:
            wrong[name] = (version, have)
    assert not wrong, f"installed versions differ from requirements.txt (locked, installed): {wrong}"
