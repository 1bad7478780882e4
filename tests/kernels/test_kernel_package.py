"""The folder ``kernels/`` is the package ``lowra_kernels``; Hugging Face's ``kernels`` keeps its name.

HF's ``kernels`` distribution (used by bitsandbytes and transformers) owns the top-level import name
``kernels``. The project's folder has no ``__init__.py`` (so, from the repository root, it is at most
a namespace-package portion of ``kernels``, which ranks below an installed regular package) and is
imported as ``lowra_kernels``: mapped by setup.cfg's ``package_dir`` when installed, and by the
root module ``lowra_kernels.py`` (``__path__`` = the folder) when run from a checkout without an
install (the GPU image). docs/design.md "Package names" has the design.

Subprocesses: an import made in this process cannot be undone, and the repository root must be
first on ``sys.path`` (``python -c`` from the root) as it is for ``python -m experiments.bench.gpu_check``.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import importlib.util
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from setuptools import find_packages

import lowra_kernels

REPO = Path(__file__).resolve().parents[2]
FOLDER = REPO / "kernels"


def _run(code: str, cwd: Path, *python_args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python_args, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _in_repository(path: str | Path) -> bool:
    """Whether ``path`` is a file of this repository's own tree. A virtualenv inside the checkout
    (``make venv`` puts ``.venv`` there) holds installed distributions, not the repository's code."""
    where = Path(path).resolve()
    if REPO not in where.parents:
        return False
    environments = {Path(p).resolve() for p in (sys.prefix, sys.exec_prefix, *site.getsitepackages())}
    return not any(env == where or env in where.parents for env in environments) and "site-packages" not in where.parts


def test_in_repository_knows_a_virtualenv_inside_the_checkout():
    assert _in_repository(FOLDER / "layout.py")
    assert _in_repository(REPO / "lowra_kernels.py")
    assert not _in_repository(REPO / ".venv" / "lib" / "python3.11" / "site-packages" / "kernels" / "__init__.py")
    assert not _in_repository(REPO.parent / "elsewhere.py")


def _hf_kernels_version() -> str | None:
    try:
        return importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None


def test_folder_is_no_regular_package_and_maps_to_lowra_kernels():
    assert not (FOLDER / "__init__.py").exists(), "kernels/__init__.py would shadow HF's `kernels` from the root"
    dirs = [Path(p).resolve() for p in lowra_kernels.__path__ if Path(p).is_dir()]
    assert dirs == [FOLDER], lowra_kernels.__path__
    from lowra_kernels import layout

    assert Path(layout.__file__).resolve() == FOLDER / "layout.py"
    assert layout.__name__ == "lowra_kernels.layout"


def test_setup_cfg_lists_every_package_and_maps_the_folder():
    """setup.cfg names its packages (``find:`` cannot rename a folder): the list must follow the tree."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = cfg["options"]["packages"].split()
    mapping = (line.split("=") for line in cfg["options"]["package_dir"].splitlines() if line.strip())
    package_dir = {name.strip(): folder.strip() for name, folder in mapping}
    assert package_dir == {"lowra_kernels": "kernels"}
    found = find_packages(str(REPO), include=["lowra", "lowra.*", "experiments", "experiments.*"])
    assert sorted(listed) == sorted([*found, "lowra_kernels"]), "update [options] packages in setup.cfg"
    assert "kernels" not in listed and not any(p.startswith("kernels.") for p in listed)


def test_checkout_without_install_imports_lowra_kernels():
    """The GPU image: no ``pip install``, ``python -m ...`` from the root. ``-S`` skips site's ``.pth`` files
    (the editable install's finder); site-packages go on ``PYTHONPATH`` so torch/triton still import."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages())}
    proc = _run(
        """
        import runpy, sys
        import lowra_kernels, lowra_kernels.layout
        assert lowra_kernels.__file__.endswith("lowra_kernels.py"), lowra_kernels.__file__
        print(lowra_kernels.__path__[0]); print(lowra_kernels.layout.__file__)
        sys.argv = ["compile_check", "--help"]
        try:
            runpy.run_module("lowra_kernels.compile_check", run_name="__main__")  # as python -m would
        except SystemExit as e:
            assert e.code == 0, e.code
        """, REPO, "-S", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert Path(lines[0]).resolve() == FOLDER and Path(lines[1]).resolve() == FOLDER / "layout.py"
    assert "--arch" in proc.stdout


def test_installed_mapping_outside_the_checkout(tmp_path):
    """Installed (``pip install -e .`` in ``make venv`` and CI): from any directory ``lowra_kernels`` is the
    ``kernels/`` folder of the checkout (or the wheel's ``lowra_kernels/``) that ``lowra`` comes from."""
    try:
        importlib.metadata.distribution("lowra")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the project is not installed in this environment (pip install -e .)")
    proc = _run(
        """
        import pathlib, lowra
        print(pathlib.Path(lowra.__file__).resolve().parent.parent, flush=True)
        import lowra_kernels.layout
        print(pathlib.Path(lowra_kernels.layout.__file__).resolve().parent)
        """, tmp_path)
    lines = proc.stdout.splitlines()
    if lines and Path(lines[0]) != REPO and (Path(lines[0]) / "setup.cfg").exists():
        pytest.skip(f"the environment's editable install is another checkout ({lines[0]}), not this one")
    assert proc.returncode == 0 and len(lines) == 2, proc.stderr[-3000:]
    root, folder = (Path(line) for line in lines)
    assert folder in (root / "kernels", root / "lowra_kernels"), (root, folder)
    if folder == root / "kernels":  # editable: the folder keeps no __init__.py there either
        assert not (folder / "__init__.py").exists()


def test_project_never_provides_a_regular_kernels_package():
    """From the root, ``import kernels`` is HF's package when installed, else at most a namespace portion
    (``__file__`` None) — never a module of this repository."""
    proc = _run(
        """
        try:
            import kernels
        except ModuleNotFoundError:
            print("absent")
        else:
            print(getattr(kernels, "__file__", None))
        """, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where = proc.stdout.strip().splitlines()[-1]
    assert where in ("absent", "None") or not _in_repository(where), where


@pytest.mark.skipif(_hf_kernels_version() is None,
                    reason="Hugging Face's `kernels` is not installed (pip install kernels); nothing to coexist with")
def test_hf_kernels_and_lowra_kernels_coexist_from_the_repo_root():
    proc = _run(
        """
        import pathlib, kernels
        from kernels import get_kernel
        import lowra_kernels.lut_matmul, lowra_kernels.dequantize
        print(pathlib.Path(kernels.__file__).resolve())
        """, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf_file = Path(proc.stdout.strip().splitlines()[-1])
    assert not _in_repository(hf_file), f"`kernels` resolved inside the repository: {hf_file}"


@pytest.mark.skipif(_hf_kernels_version() is None,
                    reason="Hugging Face's `kernels` is not installed (pip install kernels); nothing to coexist with")
def test_bitsandbytes_imports_without_kernels_import_error():
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes (extra `dev`) is not installed")
    proc = _run("import bitsandbytes\nprint('ok')", REPO)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    assert "cannot import name" not in proc.stderr and "No module named 'kernels'" not in proc.stderr, proc.stderr
