"""HiGHS through CVXPY: one place that starts the solver, silences its banner, passes options."""

from __future__ import annotations

from typing import Any


def _solver_name() -> str:
    import cvxpy as cp
    import highspy  # noqa: F401
    try:
        from importlib.metadata import version
        hv = version("highspy")
    except Exception:  # pragma: no cover
        hv = "?"
    return f"HIGHS (highspy {hv}) via CVXPY {cp.__version__}"


_BANNER_DONE = False


def _silence_banner() -> None:
    """HiGHS prints a copyright banner from the first ``Highs()`` of a process, before any
    option can be set; create that first instance with the C-level stdout muted."""
    global _BANNER_DONE
    if _BANNER_DONE:
        return
    import os
    import sys

    import highspy

    _BANNER_DONE = True
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real stdout: nothing to protect
        highspy.Highs()
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _solve(prob: Any, opts: dict[str, Any], highs: dict[str, Any] | None = None) -> None:
    """Solve a CVXPY problem with HiGHS; ``opts`` are CVXPY/HiGHS keyword options (None
    values dropped), ``highs`` options that clash with CVXPY's own names (``solver``)."""
    import cvxpy as cp
    if "HIGHS" not in cp.installed_solvers():
        raise RuntimeError("CVXPY does not see HiGHS: pip install highspy")
    kw = {k: v for k, v in opts.items() if v is not None}
    if kw.get("threads") is not None:
        # HiGHS fixes its thread pool on the first solve of the process; a different
        # ``threads`` later fails unless the global scheduler is reset first.
        import highspy

        highspy.Highs.resetGlobalScheduler(True)
    if not kw.get("verbose"):
        kw.setdefault("output_flag", False)
        _silence_banner()
    if highs:
        kw["highs_options"] = dict(highs)
    prob.solve(solver=cp.HIGHS, **kw)
