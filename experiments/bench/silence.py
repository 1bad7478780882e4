"""The longest silences of a command: how long a user waits between two lines of its output.

Issue 32's target is "no stage silent for more than 10 s on SmolLM2 on 2 cores". This runs a command
(by default the runner's main job on SmolLM2 at 2 bits, one training step), stamps every line of its
stdout and stderr with the time it arrived, and reports the longest gaps with the line that ended
each (so the table names the stage that was silent).

    .venv/bin/python -m experiments.bench.silence [--out results/bench/silence_smollm2.json] [--top 10]
        [--limit 10] [-- COMMAND ...]

Prints a table of the ``--top`` gaps and writes JSON (command, load average before and after, every
gap over 1 s, the lines around each); exits 1 when the command fails or a gap exceeds ``--limit``
seconds. Gaps measured on a loaded machine are longer: the JSON records the load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[2]
DEFAULT = [sys.executable, "-m", "experiments.run", "+model=smollm2_135m", "+bits=2", "train.max_steps=1",
           "logger=none", "progress=true", "eval.fp=false", "eval.max_tokens=512"]


def stamped_lines(command: list[str], env: dict[str, str]) -> tuple[int, list[tuple[float, str]]]:
    """Run ``command``; ``(exit code, [(seconds since start, line)])`` of stdout and stderr together.

    The start itself is line 0 (``"<start>"``), so the silence before the first line counts."""
    t0 = time.perf_counter()
    lines: list[tuple[float, str]] = [(0.0, "<start>")]
    lock = threading.Lock()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO,
                            text=True, errors="replace", bufsize=1)

    def pump(stream: IO[str]) -> None:
        for line in stream:
            with lock:
                lines.append((time.perf_counter() - t0, line.rstrip("\n")))
            sys.stdout.write(line)

    threads = [threading.Thread(target=pump, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)]
    for t in threads:
        t.start()
    code = proc.wait()
    for t in threads:
        t.join()
    lines.append((time.perf_counter() - t0, "<exit>"))
    return code, sorted(lines, key=lambda x: x[0])


def gaps(lines: list[tuple[float, str]]) -> list[dict[str, object]]:
    """Every gap between consecutive lines, longest first: ``{seconds, at, before, after}``."""
    out = [{"seconds": round(b[0] - a[0], 2), "at": round(b[0], 2), "before": a[1][:200], "after": b[1][:200]}
           for a, b in zip(lines, lines[1:])]
    return sorted(out, key=lambda g: -float(g["seconds"]))  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "results" / "bench" / "silence_smollm2.json"))
    ap.add_argument("--top", type=int, default=10, help="gaps shown in the table")
    ap.add_argument("--limit", type=float, default=10.0, help="the longest silence allowed, seconds")
    ap.add_argument("command", nargs="*", help="the command (after --); default: the SmolLM2 2-bit main job")
    args = ap.parse_args(argv)
    command = args.command or DEFAULT
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    load_before = os.getloadavg()
    code, lines = stamped_lines(command, env)
    load_after = os.getloadavg()
    found = gaps(lines)
    print(f"\n{'gap s':>7}  {'at s':>7}  line before the silence  ->  line that ended it")
    for g in found[: args.top]:
        print(f"{g['seconds']:>7.1f}  {g['at']:>7.1f}  {str(g['before'])[:70]!s}  ->  {str(g['after'])[:70]}")
    longest = float(found[0]["seconds"]) if found else 0.0
    print(f"longest silence {longest:.1f} s (limit {args.limit:g} s); exit code {code}; "
          f"load {load_before[0]:.1f} before, {load_after[0]:.1f} after; {lines[-1][0]:.0f} s in all")
    record = {"command": command, "exit_code": code, "limit_s": args.limit, "longest_s": longest,
              "total_s": round(lines[-1][0], 1), "load_before": load_before, "load_after": load_after,
              "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "gaps_over_1s": [g for g in found if float(g["seconds"]) > 1.0]}  # type: ignore[arg-type]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if code == 0 and longest <= args.limit else 1


if __name__ == "__main__":
    raise SystemExit(main())
