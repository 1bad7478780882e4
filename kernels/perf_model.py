"""A calibrated performance model of the LUT kernels: time from the compiled SASS, no GPU needed.

For one launch (a ``Launch``: the grid, the warps, the K-loop trip count, the bytes it moves and the
SASS features of its binary — ``Sass``) on one ``GPU``:

* **occupancy**: CTAs resident per SM from registers (allocated per warp in 256-register units),
  shared memory (+1 KB reserved per CTA), warps (64) and CTAs (32) per SM; the busiest SM runs
  ``ceil(grid / SMs)`` CTAs (waves);
* **issue**: warp-instructions of the busiest SM over its issue rate, ``min(schedulers · η_issue,
  resident warps / cpi)`` per cycle (``cpi``: cycles one warp needs between instructions, which
  few resident warps cannot hide); shared-memory instructions (``LDS``/``STS``, and the K loop's
  warp shuffles ``SHFL``, which use the same pipe) take ``c_smem`` cycles each in the SM's one
  shared-memory pipe; per barrier a CTA waits ``c_bar`` cycles, hidden by
  the other resident CTAs;
* **memory**: bytes over ``η_bw · BW`` of the level they stream from (L2 when the replayed working
  set fits in it, else HBM), capped by Little's law: an SM keeps ``resident warps × bytes one warp
  loads per K step`` (the ``LDG`` widths from the SASS, × 32 lanes) in flight, so the bandwidth
  is at most ``active SMs × bytes in flight / latency``;
* ``time = fixed + max(t_mem, t_pipe) + ρ · min(t_mem, t_pipe) + t_bar`` (``ρ``: how much
  memory and issue fail to overlap).

The constants (``Constants``: ``fixed_us``, ``eta_hbm``, ``eta_l2``, ``eta_issue``, ``cpi``,
``latency_ns``, ``c_bar``, ``c_smem``, ``rho``) are fitted (``fit``) to measured times on the H200
(``results/bench/h200``: the GEMV sweep and the dequantize configs), by least squares on the log
of predicted / measured time; ``leave_one_out`` refits without each point and predicts it, the
honest error of the model. Another GPU (``H100``) is predicted by swapping the peaks (SMs, clock,
HBM) and keeping the fitted efficiencies. ``experiments.bench.perf_model`` compiles the measured
configs (``Sass`` features, cached in ``results/bench/perf_model_features.json`` so a refit needs
no compiler), fits, validates and prints the table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class GPU:
    """Peaks of one GPU. ``l2_gbps``: SM↔L2 bandwidth (64 B per SM per cycle)."""

    name: str
    sms: int
    clock_ghz: float
    hbm_gbps: float
    l2_mb: float
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    max_warps: int = 64
    max_ctas: int = 32
    schedulers: int = 4

    @property
    def l2_gbps(self) -> float:
        return self.sms * 64 * self.clock_ghz


# H200 SXM: HBM peak from the driver's clocks as the H200 run recorded it (results/bench/h200);
# H100 SXM 80 GB: HBM3 at 2.619 GHz × 5120 bit × 2 = 3352 GB/s; both GH100 at up to 1.98 GHz, 50 MB L2.
H200 = GPU("H200", sms=132, clock_ghz=1.98, hbm_gbps=4814.3, l2_mb=50.0)
H100 = GPU("H100 SXM", sms=132, clock_ghz=1.98, hbm_gbps=3352.0, l2_mb=50.0)
GPUS = {"H200": H200, "H100": H100}


@dataclass(frozen=True)
class Constants:
    """The fitted constants (see the module docstring)."""

    fixed_us: float = 3.0
    eta_hbm: float = 0.8
    eta_l2: float = 0.5
    eta_issue: float = 0.7
    cpi: float = 6.0
    latency_ns: float = 700.0
    c_bar: float = 40.0
    c_smem: float = 1.0
    rho: float = 0.3


BOUNDS = {"fixed_us": (0.0, 20.0), "eta_hbm": (0.2, 1.0), "eta_l2": (0.05, 1.0), "eta_issue": (0.1, 1.0),
          "cpi": (1.0, 40.0), "latency_ns": (100.0, 3000.0), "c_bar": (0.0, 500.0), "c_smem": (0.25, 8.0),
          "rho": (0.0, 1.0)}


@dataclass(frozen=True)
class Sass:
    """Per-warp SASS features of one binary: instructions of the K-loop body (``loop_*``, one trip)
    and of the rest (``rest_*``), global-load bytes per lane of one loop trip (``loop_ldg_bytes``; the
    whole kernel when it has no loop), shared-memory instructions and barriers."""

    registers: int
    shared_bytes: int
    loop_instr: int
    rest_instr: int
    loop_smem: int
    rest_smem: int
    loop_bar: int
    rest_bar: int
    ldg_bytes: int

    @classmethod
    def from_stats(cls, registers: int, shared_bytes: int, stats: dict, has_loop: bool = True) -> Sass:
        """From ``compile_check.analyze_sass`` statistics. ``has_loop=False`` (a kernel whose steps are
        unrolled, like dequantize): everything counts as ``rest``."""
        loop_mem = stats["main_loop_mem"] if has_loop else {"BAR": 0}
        kmem = stats["kernel_mem"]

        def smem(mem: dict) -> int:
            return sum(sum(mem.get(k, {}).values()) for k in ("LDS", "STS", "LDSM"))

        def ldg(mem: dict) -> int:
            return sum(int(w) * n for w, n in mem.get("LDG", {}).items())

        loop_instr = stats["main_loop_instructions"] if has_loop else 0
        # warp shuffles of the K loop go through the shared-memory (MIO) pipe as well, 32 lanes a clock
        shfl = stats.get("main_loop_mix", {}).get("SHFL", 0) if has_loop else 0
        return cls(registers=registers, shared_bytes=shared_bytes, loop_instr=loop_instr,
                   rest_instr=stats["instructions"] - loop_instr, loop_smem=smem(loop_mem) + shfl,
                   rest_smem=smem(kmem) - smem(loop_mem), loop_bar=loop_mem["BAR"],
                   rest_bar=kmem["BAR"] - loop_mem["BAR"], ldg_bytes=ldg(loop_mem if has_loop else kmem))


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``grid`` CTAs of ``warps`` warps, ``trips`` K-loop trips per CTA (the
    longest), ``bytes`` moved, whether they stream from L2 (``resident``), its ``Sass``, and how many
    ways its shared-memory accesses conflict (``smem_ways``: the SASS cannot tell; the kernel's
    table layout can)."""

    grid: int
    warps: int
    trips: int
    bytes: float
    resident: bool
    sass: Sass
    smem_ways: float = 1.0  # bank-conflict ways of a shared-memory access (from the kernel's indexing)


def occupancy(sass: Sass, warps: int, gpu: GPU) -> int:
    """CTAs resident per SM (≥ 1)."""
    per_warp = math.ceil(max(sass.registers, 1) * 32 / 256) * 256
    by_regs = gpu.regs_per_sm // (per_warp * warps)
    by_smem = gpu.smem_per_sm // (sass.shared_bytes + 1024)
    return max(1, min(by_regs, by_smem, gpu.max_warps // warps, gpu.max_ctas))


def _static(launches: Sequence[Launch], gpu: GPU) -> dict[str, np.ndarray]:
    """The constant-free quantities of each launch on ``gpu`` (arrays over launches)."""
    rows = []
    for la in launches:
        s = la.sass
        ctas = occupancy(s, la.warps, gpu)
        per_sm = math.ceil(la.grid / gpu.sms)  # CTAs on the busiest SM
        resident = min(ctas, per_sm)
        rows.append((
            ctas, la.grid / (ctas * gpu.sms), resident * la.warps,
            per_sm * la.warps * (la.trips * s.loop_instr + s.rest_instr),
            per_sm * la.warps * (la.trips * s.loop_smem + s.rest_smem) * la.smem_ways,
            math.ceil(per_sm / resident) * (la.trips * s.loop_bar + s.rest_bar),
            resident * la.warps * s.ldg_bytes * 32, min(gpu.sms, la.grid), la.bytes, float(la.resident)))
    a = np.array(rows, dtype=float).reshape(-1, 10)
    keys = ("ctas_per_sm", "waves", "warps_res", "instr", "smem", "bars", "in_flight", "active_sms", "bytes",
            "resident")
    return {k: a[:, i] for i, k in enumerate(keys)}


def _terms(st: dict[str, np.ndarray], gpu: GPU, c: Constants) -> dict[str, np.ndarray]:
    cycles_per_us = gpu.clock_ghz * 1e3
    rate = np.minimum(gpu.schedulers * c.eta_issue, st["warps_res"] / c.cpi)
    t_issue = st["instr"] / rate / cycles_per_us
    t_smem = st["smem"] * c.c_smem / cycles_per_us
    t_pipe = np.maximum(t_issue, t_smem)
    t_bar = st["bars"] * c.c_bar / cycles_per_us
    peak = np.where(st["resident"] > 0, c.eta_l2 * gpu.l2_gbps, c.eta_hbm * gpu.hbm_gbps)
    little = st["active_sms"] * st["in_flight"] / c.latency_ns  # GB/s
    bw = np.where(little > 0, np.minimum(peak, little), peak)
    t_mem = st["bytes"] / bw / 1e3
    us = c.fixed_us + np.maximum(t_mem, t_pipe) + c.rho * np.minimum(t_mem, t_pipe) + t_bar
    return {"us": us, "t_mem": t_mem, "t_issue": t_issue, "t_smem": t_smem, "t_bar": t_bar,
            "ctas_per_sm": st["ctas_per_sm"], "waves": st["waves"], "bw_gbps": bw, "little_gbps": little,
            "in_flight_kb": st["in_flight"] / 1024}


def terms(launch: Launch, gpu: GPU, c: Constants) -> dict[str, float]:
    """The model's terms (µs) and intermediate quantities of one launch."""
    return {k: float(v[0]) for k, v in _terms(_static([launch], gpu), gpu, c).items()}


def predict(launch: Launch, gpu: GPU, c: Constants) -> float:
    """Predicted kernel time in µs."""
    return terms(launch, gpu, c)["us"]


def predict_many(launches: Sequence[Launch], gpu: GPU, c: Constants) -> np.ndarray:
    """Predicted kernel times in µs of many launches (vectorized)."""
    return _terms(_static(launches, gpu), gpu, c)["us"]


def _vector(c: Constants) -> np.ndarray:
    return np.array([getattr(c, f.name) for f in fields(Constants)], dtype=float)


def _constants(v: Sequence[float]) -> Constants:
    return Constants(**{f.name: float(x) for f, x in zip(fields(Constants), v)})


def _fit_static(st: dict[str, np.ndarray], y: np.ndarray, gpu: GPU, starts: Sequence[Constants],
                weights: np.ndarray | None = None) -> Constants:
    from scipy.optimize import least_squares

    sw = np.ones_like(y) if weights is None else np.sqrt(weights)
    names = [f.name for f in fields(Constants)]
    lo = np.array([BOUNDS[n][0] for n in names])
    hi = np.array([BOUNDS[n][1] for n in names])

    def resid(v: np.ndarray) -> np.ndarray:
        return (np.log(_terms(st, gpu, _constants(v))["us"]) - y) * sw

    best = None
    for s0 in starts:
        r = least_squares(resid, np.clip(_vector(s0), lo, hi), bounds=(lo, hi), x_scale=hi - lo, diff_step=1e-4)
        if best is None or r.cost < best.cost:
            best = r
    return _constants(best.x)


START_POINTS = (Constants(), Constants(cpi=2.0, latency_ns=400.0, rho=0.0),
                Constants(eta_l2=0.2, cpi=12.0, c_bar=150.0, rho=1.0), Constants(eta_issue=0.3, c_smem=3.0))


def fit(launches: Sequence[Launch], measured_us: Sequence[float], gpu: GPU = H200,
        starts: Sequence[Constants] = START_POINTS, weights: Sequence[float] | None = None) -> Constants:
    """Least squares on ``log(predicted / measured)`` (times ``weights``) within ``BOUNDS`` (scipy),
    best of ``starts``."""
    w = None if weights is None else np.asarray(weights, dtype=float)
    return _fit_static(_static(launches, gpu), np.log(np.asarray(measured_us, dtype=float)), gpu, starts, w)


def leave_one_out(launches: Sequence[Launch], measured_us: Sequence[float], gpu: GPU = H200,
                  start: Constants | None = None, weights: Sequence[float] | None = None) -> np.ndarray:
    """Prediction of each point by the model fitted to all the others (each refit starts from
    ``start``, by default the fit to all points)."""
    st = _static(launches, gpu)
    y = np.log(np.asarray(measured_us, dtype=float))
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float)
    start = start or fit(launches, measured_us, gpu, weights=weights)
    out = np.empty(len(launches))
    for i in range(len(launches)):
        keep = np.arange(len(launches)) != i
        c = _fit_static({k: v[keep] for k, v in st.items()}, y[keep], gpu, (start,), w[keep])
        out[i] = _terms({k: v[i:i + 1] for k, v in st.items()}, gpu, c)["us"][0]
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x: Sequence[float]) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties: the mean rank
            m = x == v
            r[m] = r[m].mean()
        return r

    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def scores(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, Any]:
    """Spearman, median and max relative error, and whether the predicted-best config is within 10 %
    of the measured best (its measured time ≤ 1.1 × the best measured)."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    rel = np.abs(p - m) / m
    top_measured = float(m[int(np.argmin(p))])
    return {"n": len(m), "spearman": spearman(p, m), "median_rel_err": float(np.median(rel)),
            "max_rel_err": float(rel.max()), "top_config_measured_us": top_measured,
            "best_measured_us": float(m.min()), "top_within_10pct": bool(top_measured <= 1.1 * m.min())}


def constants_dict(c: Constants) -> dict[str, float]:
    """``Constants`` as a plain dict (JSON)."""
    return asdict(c)


def with_gpu_peaks(gpu: GPU, **peaks: Any) -> GPU:
    """``gpu`` with some peaks swapped (``hbm_gbps=``, ``clock_ghz=``, ``sms=`` ...)."""
    return replace(gpu, **peaks)
