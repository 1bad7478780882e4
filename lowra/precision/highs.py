"""HiGHS: one place that starts the solver, silences its banner, passes options.

``_solve`` runs a CVXPY problem (the LPs of stage 2 and the reference flat ILP); :func:`solve_mip` runs
the stage-1 integer program directly through highspy, deterministically (one thread, fixed seed, a node
limit instead of a clock) and with a MIP start.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp


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
    kw.pop("max_nodes", None)  # solve_mip's work limit; these LPs have no nodes
    _use_scheduler(int(kw.get("threads") or 1))
    kw["threads"] = int(kw.get("threads") or 1)
    if not kw.get("verbose"):
        kw.setdefault("output_flag", False)
        _silence_banner()
    if highs:
        kw["highs_options"] = dict(highs)
    prob.solve(solver=cp.HIGHS, **kw)


@dataclass
class MipResult:
    """What :func:`solve_mip` found: ``x`` (None when no feasible point), the objective, HiGHS' model
    status (``"optimal"`` when the gap tolerance was met), the final relative MIP gap, and the work done."""

    x: np.ndarray | None
    objective: float
    status: str
    mip_gap: float
    nodes: int
    lp_iterations: int


#: Work, not time: a stage-1 program that has not met its gap after this many branch-and-bound nodes
#: stops with its best plan (status "node limit"). The same inputs give the same plan on any machine.
DEFAULT_MAX_NODES = 1_000

#: Options that make HiGHS' search a function of its inputs alone (one thread, fixed seed, no clock).
DETERMINISTIC = {"threads": 1, "parallel": "off", "random_seed": 0, "time_limit": float("inf")}


def _progress_enabled(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    from lowra.progress import log

    return log.isEnabledFor(logging.INFO)


class GapReporter:
    """HiGHS MIP callback: a ``plan: ILP …`` line on the ``lowra`` logger at most every
    ``lowra.progress.PLAIN_INTERVAL_S`` seconds (4) with the nodes explored, the relative gap and the
    bounds. It only reads HiGHS' state (it never sets ``user_interrupt``), so the search and the plan
    are what they are without it; the clock decides when a line is written, nothing else."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.lines = 0

    def __call__(self, event: Any) -> None:
        from lowra.progress import PLAIN_INTERVAL_S, log

        now = time.perf_counter()
        if now - self.last < PLAIN_INTERVAL_S:
            return
        self.last = now
        out = event.data_out
        gap = f"{out.mip_gap:.2e}" if math.isfinite(out.mip_gap) else "inf (no bound or incumbent yet)"
        log.info("plan: ILP %d nodes, gap %s (best %.6g, bound %.6g) · %.1f s", int(out.mip_node_count), gap,
                 out.mip_primal_bound, out.mip_dual_bound, now - self.t0)
        self.lines += 1


def solve_mip(c: np.ndarray, A: sp.csr_matrix, row_lo: np.ndarray, row_hi: np.ndarray, col_lo: np.ndarray,
              col_hi: np.ndarray, integer: np.ndarray, options: dict[str, Any],
              start: np.ndarray | None = None, progress: bool | None = None) -> MipResult:
    """``min c·x`` s.t. ``row_lo <= A x <= row_hi``, ``col_lo <= x <= col_hi``, ``x[integer]`` integral,
    by HiGHS (highspy, no modelling layer), deterministically.

    ``options``: HiGHS options; ``verbose`` turns the log on, ``max_nodes`` is ``mip_max_nodes``
    (default :data:`DEFAULT_MAX_NODES`), ``time_limit`` a wall-clock limit (None: none; a plan cut by the
    clock depends on the machine, so the planner sets none by default). HiGHS runs on one thread with a
    fixed seed (:data:`DETERMINISTIC`), so its search depends on its inputs alone.
    ``start``: a feasible point handed to HiGHS as its first incumbent (a MIP start).
    ``progress``: log the search's gap as it goes (:class:`GapReporter`); ``None``: when the ``lowra``
    logger is enabled for INFO (the runner, or any program that configures INFO logging).
    """
    import highspy

    opts = {k: v for k, v in options.items() if v is not None}
    verbose = bool(opts.pop("verbose", False))
    if int(opts.pop("threads", 1)) != 1:
        raise ValueError("the stage-1 program runs HiGHS on one thread (deterministic)")
    opts.setdefault("mip_max_nodes", opts.pop("max_nodes", DEFAULT_MAX_NODES))
    settings = {**DETERMINISTIC, **opts}
    _silence_banner()
    _use_scheduler(settings["threads"])
    h = highspy.Highs()
    h.setOptionValue("output_flag", verbose)
    for key, value in settings.items():
        if h.setOptionValue(key, value) != highspy.HighsStatus.kOk:
            raise ValueError(f"HiGHS rejected the option {key}={value!r}")
    lp = highspy.HighsLp()  # HiGHS' infinity is IEEE inf: unbounded sides pass through as they are
    lp.num_col_, lp.num_row_ = c.shape[0], A.shape[0]
    lp.col_cost_ = np.asarray(c, dtype=np.float64)
    lp.col_lower_, lp.col_upper_ = np.asarray(col_lo, np.float64), np.asarray(col_hi, np.float64)
    lp.row_lower_, lp.row_upper_ = np.asarray(row_lo, np.float64), np.asarray(row_hi, np.float64)
    csc = sp.csc_matrix(A)
    csc.sort_indices()
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = csc.indptr.astype(np.int32)
    lp.a_matrix_.index_ = csc.indices.astype(np.int32)
    lp.a_matrix_.value_ = csc.data.astype(np.float64)
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                       for i in np.asarray(integer, dtype=bool)]
    h.passModel(lp)
    if start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = np.asarray(start, dtype=np.float64).tolist()
        h.setSolution(sol)
    if bool(np.any(integer)) and _progress_enabled(progress):
        h.cbMipInterrupt.subscribe(GapReporter())  # reads the search's state; sets nothing
    h.run()
    status = h.modelStatusToString(h.getModelStatus()).lower()
    info = h.getInfo()
    if status == "solution limit reached" and int(info.mip_node_count) >= int(settings["mip_max_nodes"]):
        status = "node limit"
    solution = h.getSolution()
    has_x = info.primal_solution_status == 2  # kSolutionStatusFeasible
    x = np.asarray(solution.col_value, dtype=np.float64) if has_x else None
    return MipResult(x=x, objective=float(info.objective_function_value) if has_x else math.inf, status=status,
                     mip_gap=float(info.mip_gap), nodes=int(info.mip_node_count),
                     lp_iterations=int(info.simplex_iteration_count))


_SCHEDULER_THREADS: int | None = None


def _use_scheduler(threads: int) -> None:
    """HiGHS fixes its global thread pool at the first solve of a process, and a solve asking for another
    ``threads`` fails; reset the pool whenever the count asked for changes."""
    global _SCHEDULER_THREADS
    if _SCHEDULER_THREADS != threads:
        import highspy

        highspy.Highs.resetGlobalScheduler(True)
        _SCHEDULER_THREADS = threads
