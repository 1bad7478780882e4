"""What a person reads at the end: a run summary and a sweep table.

``run_summary(results)`` is the last thing a run prints (after W&B's own summary): method,
nominal/effective bits, the metric from full precision through quantization and initialization to
fine-tuning, steps, times, peak memory and where ``results.json`` is. Per-step losses stay in
``results.json``; they are never logged as one long line.

``sweep_table(sweep_dir)`` gathers every job of a Hydra multirun (finished: ``results.json``;
skipped: ``skipped.json``; failed: ``failed.json``; neither: incomplete) into one Markdown table.
The Hydra callback :class:`SweepSummary` (registered in ``conf/run.yaml``) prints it at the end of
every sweep and writes it to ``<sweep_dir>/summary.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lowra.atomic import write_text_atomic

STAGE_NAMES = (("fp", "fp"), ("quantized", "quantized"), ("loftq", "init"), ("finetuned", "fine-tuned"))


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def _metric(value: Any) -> str:
    """A perplexity, or a ROUGE dict as ``R1/R2/RL``."""
    if isinstance(value, dict):
        return "/".join(_num(value.get(k), 1) for k in ("rouge1", "rouge2", "rougeL"))
    return _num(value)


def _bytes(n: Any) -> str:
    if not isinstance(n, int | float) or n <= 0:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return "—"


def _seconds(s: Any) -> str:
    if not isinstance(s, int | float):
        return "—"
    if s < 120:
        return f"{s:.1f} s"
    minutes, sec = divmod(int(round(s)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {sec:02d} s"


def metric_chain(results: dict[str, Any]) -> str:
    """``perplexity  6.04 (fp) → 131.60 (quantized) → 89.60 (init) → 12.09 (fine-tuned)`` (absent stages left out)."""
    prefix = "ppl" if results.get("metric", "perplexity") == "perplexity" else "rouge"
    parts = [f"{_metric(results[f'{prefix}_{key}'])} ({label})" for key, label in STAGE_NAMES
             if results.get(f"{prefix}_{key}") is not None]
    name = "perplexity" if prefix == "ppl" else "ROUGE-1/2/L"
    return f"{name:<11} " + (" → ".join(parts) if parts else "—")


def run_summary(results: dict[str, Any], results_path: Path | str | None = None, title: str = "run finished") -> str:
    """The multi-line end-of-run summary of a ``results.json`` dict."""
    r = results
    path = results_path or (Path(r["run_dir"]) / "results.json" if r.get("run_dir") else None)
    method = r.get("method", "?")
    if r.get("quant_method") and r.get("quant_method") != method:
        method += f" (quantizer {r['quant_method']})"
    steps = r.get("train_steps")
    training = "none (train.max_steps=0)" if not steps else (
        f"{steps} steps" + (f" (resumed from step {r['resumed_from_step']})" if r.get("resumed_from_step") else "")
        + f", final loss {_num(r.get('train_loss_final'), 3)}, {r.get('optimizer', '?')}"
    )
    lines = [
        f"──── {title}: {r.get('model', '?')} · {r.get('data', '?')} · {method} ────",
        f"  bits        {_num(r.get('bits_target'))} target · {_num(r.get('bits_nominal'), 3)} nominal · "
        f"{_num(r.get('bits_effective'), 3)} effective (every stored byte)",
        f"  {metric_chain(r)}",
        f"  training    {training}",
        f"  time        quantize {_seconds(r.get('quantize_time_s'))} · train {_seconds(r.get('train_time_s'))} · "
        f"total {_seconds(r.get('wall_time_s'))}",
        f"  memory      peak {_bytes(r.get('peak_memory_bytes'))} ({r.get('device', '?')})",
        f"  results     {path}" if path else "  results     (not written)",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ sweep
COLUMNS = ("job", "method", "bits", "nominal", "effective", "fp", "quantized", "init", "fine-tuned", "steps",
           "time", "status")


def _job_row(job: Path) -> dict[str, str] | None:
    if (job / "results.json").exists():
        r = json.loads((job / "results.json").read_text())
        prefix = "ppl" if r.get("metric", "perplexity") == "perplexity" else "rouge"
        return {
            "job": job.name, "method": str(r.get("method")), "bits": _num(r.get("bits_target")),
            "nominal": _num(r.get("bits_nominal"), 3), "effective": _num(r.get("bits_effective"), 3),
            "fp": _metric(r.get(f"{prefix}_fp")), "quantized": _metric(r.get(f"{prefix}_quantized")),
            "init": _metric(r.get(f"{prefix}_loftq")), "fine-tuned": _metric(r.get(f"{prefix}_finetuned")),
            "steps": _num(r.get("train_steps")), "time": _seconds(r.get("wall_time_s")), "status": "done",
        }
    for name, status in (("skipped.json", "skipped"), ("failed.json", "FAILED")):
        if (job / name).exists():
            reason = json.loads((job / name).read_text()).get("reason") or ""
            return {c: "" for c in COLUMNS} | {"job": job.name, "status": f"{status}: {reason}"[:160]}
    if (job / ".hydra").exists():
        return {c: "" for c in COLUMNS} | {"job": job.name, "status": "incomplete (no results.json)"}
    return None


def sweep_table(sweep_dir: Path | str) -> str:
    """A Markdown table with one row per job directory of a sweep (sorted by name)."""
    rows = [row for job in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir())
            if (row := _job_row(job)) is not None]
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    out += ["| " + " | ".join(row[c].replace("|", "/") for c in COLUMNS) + " |" for row in rows]
    return "\n".join(out)


try:  # the Hydra callback (Hydra is a dependency of the runner, not of this module's helpers)
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - Hydra is installed with the package
    Callback = object  # type: ignore[assignment,misc]


class SweepSummary(Callback):  # type: ignore[misc]
    """Hydra callback: at the end of a multirun, print the sweep table and write ``summary.md``."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        if not sweep_dir.is_dir():
            return
        table = sweep_table(sweep_dir)
        write_text_atomic(sweep_dir / "summary.md", f"# Sweep {sweep_dir.name}\n\n{table}\n")
        perplexity = "values: perplexity (lower is better) or ROUGE-1/2/L; bits: target / nominal / effective"
        print(f"\n──── sweep finished: {sweep_dir} ────\n{table}\n({perplexity}; also in {sweep_dir / 'summary.md'})",
              flush=True)
