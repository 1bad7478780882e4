"""Tables of the accuracy study (issue 12): ``python -m experiments.studies.accuracy_table RUNS_DIR [--out F.md]``.

Reads every ``<RUNS_DIR>/<label>_s<seed>/results.json`` written by ``results/accuracy_study.sh``
(one runner call each), groups the seeds of a label, and prints / writes one markdown table per
model: nominal and effective bits, perplexity after quantization (no adapters), after the adapter
init (before fine-tuning) and after fine-tuning, as mean ± std over seeds, with the command that
reproduces the row (from the run's ``.hydra/overrides.yaml``). Also writes ``<RUNS_DIR>/table.json``
and ``<RUNS_DIR>/ppl_vs_bits.png``: perplexity (fine-tuned where the runs fine-tuned, else after the
adapter init) against nominal and against effective bits, one series per configuration family
(the label without its ``_b<bits>`` suffix), log scale, seed means.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

METRICS = ("ppl_quantized", "ppl_loftq", "ppl_finetuned")


def _stat(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}"


def _command(run_dir: Path) -> str:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return ""
    import yaml

    overrides = [o for o in yaml.safe_load(path.read_text()) or [] if not o.startswith(("hydra.", "seed="))]
    return "python -m experiments.run " + " ".join(overrides)


def collect(runs: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: {label: {"runs": [results...], "command": str}}}`` from ``runs``."""
    table: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for path in sorted(runs.glob("*/results.json")):
        label = re.sub(r"_s\d+$", "", path.parent.name)
        res = json.loads(path.read_text())
        row = table[res["model"]].setdefault(label, {"runs": [], "command": _command(path.parent)})
        row["runs"].append(res)
    return table


def markdown(table: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = []
    for model, rows in table.items():
        fp = [r["ppl_fp"] for row in rows.values() for r in row["runs"] if r.get("ppl_fp")]
        lines += [f"### {model} (fp ppl {statistics.fmean(fp):.2f})" if fp else f"### {model}", "",
                  "| run | error table · init · budget | nominal bits | effective bits | ppl quantized | "
                  "ppl after init (before FT) | ppl fine-tuned | seeds | command |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label, row in rows.items():
            runs = row["runs"]
            r0 = runs[0]
            how = f"{r0.get('error_table') or '—'} · {_init(r0)} · {r0.get('budget_kind', 'nominal')}"
            cells = [_stat([r.get(m) for r in runs]) for m in METRICS]
            lines.append(
                f"| {label} | {how} | {statistics.fmean(r['bits_nominal'] for r in runs):.3f} | "
                f"{statistics.fmean(r['bits_effective'] for r in runs):.3f} | " + " | ".join(cells)
                + f" | {len(runs)} | `{row['command']}` |"
            )
        lines.append("")
    return "\n".join(lines)


def _init(res: dict[str, Any]) -> str:
    """The adapter init of a run: ``calibrated``, with ``×T`` alternations and ``relearn`` when not 1 / fixed
    (from the report; the run's config where an older results.json lacks them)."""
    config = res.get("lowra_config") or {}
    iters = res.get("loftq_iters", config.get("loftq_iters", 1))
    codebooks = res.get("init_codebooks") or config.get("init_codebooks", "fixed")
    out = str(res.get("init"))
    if iters and iters != 1:
        out += f" ×{iters}"
    return out + (" relearn" if codebooks == "relearn" and iters and iters > 1 else "")


def _family(label: str) -> str:
    return re.sub(r"_b[\d.]+$", "", label)


def plot(table: dict[str, dict[str, dict[str, Any]]], out: Path) -> Path | None:
    """``ppl_vs_bits.png`` (see the module docstring); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = list(table)
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for row_axes, model in zip(axes, models, strict=True):
        rows = table[model]
        finetuned = any(r.get("ppl_finetuned") is not None for row in rows.values() for r in row["runs"])
        metric = "ppl_finetuned" if finetuned else "ppl_loftq"
        series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        for label, row in rows.items():
            vals = [r[metric] for r in row["runs"] if r.get(metric) is not None]
            if not vals:
                continue
            series[_family(label)].append((statistics.fmean(r["bits_nominal"] for r in row["runs"]),
                                           statistics.fmean(r["bits_effective"] for r in row["runs"]),
                                           statistics.fmean(vals)))
        fp = [r["ppl_fp"] for row in rows.values() for r in row["runs"] if r.get("ppl_fp")]
        for ax, col, name in ((row_axes[0], 0, "nominal"), (row_axes[1], 1, "effective")):
            for fam, pts in sorted(series.items()):
                pts.sort(key=lambda p: p[col])
                ax.plot([p[col] for p in pts], [p[2] for p in pts], marker="o", label=fam)
            if fp:
                ax.axhline(statistics.fmean(fp), color="k", ls=":", label="full precision")
            ax.set_yscale("log")
            ax.set_xlabel(f"{name} bits per weight")
            ax.set_ylabel("held-out ppl " + ("after fine-tuning" if finetuned else "after init (no FT)"))
            ax.set_title(f"{model}: {name} bits")
            ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default: RUNS/table.md)")
    args = parser.parse_args()
    table = collect(args.runs)
    text = markdown(table)
    print(text)
    (args.out or args.runs / "table.md").write_text(text + "\n")
    summary = {model: {label: {m: [r.get(m) for r in row["runs"]] for m in (*METRICS, "bits_nominal", "bits_effective")}
                       | {"command": row["command"]} for label, row in rows.items()} for model, rows in table.items()}
    (args.runs / "table.json").write_text(json.dumps(summary, indent=1) + "\n")
    if (png := plot(table, args.runs / "ppl_vs_bits.png")) is not None:
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
