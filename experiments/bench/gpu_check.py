"""One-command GPU check (``make gpu-check``): tests, dequantize bandwidth, GEMV and training speed.

Run from the repo root on a machine with an NVIDIA GPU (H100/H200 expected), in ≤ 8 minutes::

    python -m experiments.bench.gpu_check [--out results/bench/gpu_check.json] [--quick]

Each step runs as a subprocess under its own timeout and the JSON is rewritten after every step
(device name, torch/triton versions, each step's command, exit code, time, and its result), so a
hang or crash in one step still leaves the others' numbers. Steps:

1. ``lowra_kernels.compile_check --arch 90`` on all cores: every shipped kernel config compiles with this
   Triton (and its on-disk cache is warmed, so autotuning below mostly loads binaries);
2. ``pytest -m gpu`` over the test files that hold ``gpu`` tests (if pytest is installed; otherwise
   recorded as not run). Only those files are collected, so the other test modules' imports (cvxpy,
   hydra) need not be installed; the Hugging Face CUDA test quantizes stories260K, so it needs
   ``$LOWRA_ASSETS``, transformers, peft and cvxpy + highspy;
3. ``experiments.bench.train_step_gpu``: a training step of a 4-layer Llama-2-7B-shaped stack and of
   stories260K at 1.15, 2 and 4 bits vs bf16 PEFT LoRA, with peak memory (needs transformers + peft);
4. for each shape 4096×11008, 4096×4096, 11008×4096: ``experiments.bench.kernels`` with bit plans
   1, 2, 3, 4 and the 1.5-bit mix at M = 1, 16 (GEMV vs bf16 ``torch.matmul``) and 2048 (forward
   and forward+backward vs bf16) — dequantize GB/s and % of HBM peak come with it.

Steps 1 and 4 need only torch + triton (+ numpy): no cvxpy, hydra, wandb or transformers are imported.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHAPES = ("4096x11008", "4096x4096", "11008x4096")  # the main shape first
PLANS = ("1", "2", "3", "4", "mix1.5")


def gpu_test_files() -> list[str]:
    """The test files (relative to the repo) that hold ``@pytest.mark.gpu`` tests."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def _environment() -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as exc:
        env["triton"] = f"not importable: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, cuda=torch.version.cuda, sm=f"{props.major}{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    else:
        env["device"] = "no CUDA device"
    return env


def _step(name: str, cmd: list[str], timeout: int, result_file: Path | None = None) -> dict:
    """Run one step as a subprocess with a timeout; keep its tail output and its JSON result."""
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    entry: dict = {"name": name, "cmd": " ".join(cmd), "timeout_s": timeout}
    # own process group, so a timeout also ends the step's children (compile workers, ptxas)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        entry.update(rc=proc.returncode, timed_out=False, output_tail=out[-3000:])
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        entry.update(rc=None, timed_out=True, output_tail=(out or "")[-3000:])
    entry["wall_s"] = round(time.perf_counter() - t0, 1)
    if result_file is not None and result_file.exists():
        entry["result"] = json.loads(result_file.read_text())
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "gpu_check.json")
    parser.add_argument("--quick", action="store_true", help="one shape, bits 2 and the 1.5 mix (smoke run)")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    from lowra.atomic import write_text_atomic

    report = {"what": "make gpu-check", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "environment": _environment(), "steps": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        write_text_atomic(args.out, json.dumps(report, indent=1))
        last = report["steps"][-1] if report["steps"] else None
        if last:
            state = "TIMEOUT" if last["timed_out"] else f"rc={last['rc']}"
            print(f"[gpu-check] {last['name']}: {state} in {last['wall_s']} s -> {args.out}", flush=True)

    save()
    if not report["environment"]["cuda_available"]:
        print("[gpu-check] no CUDA device: nothing to check", flush=True)
        return 1
    import importlib.util

    static = args.out.with_name(f"{args.out.stem}_compile.json")
    report["steps"].append(_step("compile all kernel configs (sm_90)", [
        sys.executable, "-m", "lowra_kernels.compile_check", "--arch", "90", "--jobs", str(os.cpu_count() or 1),
        "--out", str(static)], timeout=90))
    if static.exists():
        report["steps"][-1]["result"] = json.loads(static.read_text())["summary"]
    save()
    if importlib.util.find_spec("pytest") is not None:
        report["steps"].append(_step("pytest -m gpu", [sys.executable, "-m", "pytest", "-q", "-m", "gpu",
                                                       *gpu_test_files()], timeout=150))
    else:
        report["steps"].append({"name": "pytest -m gpu", "rc": None, "timed_out": False, "wall_s": 0,
                                "not_run": "pytest is not installed in this environment"})
    save()
    train = args.out.with_name(f"{args.out.stem}_train_step.json")
    train.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "experiments.bench.train_step_gpu", "--out", str(train)]
    if args.quick:
        cmd += ["--model", "llama7b", "--layers", "2", "--bits", "2"]
    report["steps"].append(_step("train step (7B-shaped stack, stories260K)", cmd, timeout=150, result_file=train))
    save()
    shapes = SHAPES[:1] if args.quick else SHAPES
    plans = ("2", "mix1.5") if args.quick else PLANS
    for shape in shapes:
        part = args.out.with_name(f"{args.out.stem}_{shape}.json")
        part.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "experiments.bench.kernels", "--shapes", shape, "--plans", *plans,
               "--ms", "1", "16", "2048", "--reps", str(args.reps), "--out", str(part)]
        report["steps"].append(_step(f"bench {shape}", cmd, timeout=90, result_file=part))
        save()
    ok = all(s.get("rc") == 0 for s in report["steps"] if "not_run" not in s)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report["all_steps_ok"] = ok
    save()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
