"""A real run on stories260K at 2 bits (CLI, W&B offline), resume after an interruption, notebooks.

One small real run is shared by the tests of this module: ``python -m experiments.run +bits=2``
with a handful of optimizer steps and 2,048 evaluation tokens.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments.eval.evaluate import perplexity
from experiments.runner import train as train_module
from experiments.runner.config_check import CONF_DIR, REPO_ROOT
from experiments.runner.data import DataUnavailableError, load_data
from experiments.runner.run import run
from experiments.runner.setup import load_tokenizer

FAST = [
    "+bits=2",
    "train.max_steps=8",
    "train.batch_size=4",
    "train.seq_len=128",
    "train.checkpoint_every=2",
    "train.log_every=2",
    "eval.max_tokens=2048",
    "progress=false",
]
RESULT_KEYS = {
    "method", "model", "data", "bits_target", "bits_nominal", "bits_effective", "ppl_fp", "ppl_quantized",
    "ppl_loftq", "ppl_finetuned", "train_steps", "train_loss_final", "peak_memory_bytes", "quantize_time_s",
    "train_time_s", "wall_time_s", "device", "versions",
}


def _env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp), "WANDB_CONFIG_DIR": str(tmp / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp / "wandb-cache"), "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false",
    }


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """The run directory of one real CLI run (W&B offline into the run directory)."""
    tmp = tmp_path_factory.mktemp("e2e")
    run_dir = tmp / "sweep" / "stories260k_lowra_b2"
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", *FAST, "logger=wandb", f"hydra.run.dir={run_dir}"],
        cwd=REPO_ROOT, env=_env(tmp), capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return run_dir


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_end_to_end_results(cli_run):
    r = _results(cli_run)
    assert RESULT_KEYS <= set(r)
    assert (r["method"], r["model"], r["data"], r["bits_target"]) == ("lowra", "stories260k", "tinystories", 2.0)
    assert abs(r["bits_nominal"] - 2.0) < 0.01 and r["bits_effective"] > r["bits_nominal"]
    assert r["train_steps"] == 8 and len(r["train_losses"]) == 8 and math.isfinite(r["train_loss_final"])
    assert 3.0 < r["ppl_fp"] < 10.0  # the real model on real held-out stories
    assert r["ppl_quantized"] > r["ppl_fp"]
    assert r["ppl_loftq"] < r["ppl_quantized"]  # LoftQ init recovers part of the quantization error
    assert r["ppl_finetuned"] < r["ppl_quantized"]  # fine-tuning helps
    assert r["device"] == "cpu" and r["versions"]["torch"] == torch.__version__
    assert r["peak_memory_bytes"] > 0 and r["quantize_time_s"] > 0 and r["wall_time_s"] >= r["train_time_s"]
    assert sum(sum(h.values()) for h in r["bits_by_layer_type"].values()) == 5 * (64 + 32 + 32 + 64 + 172 + 172 + 64)
    assert (cli_run / "quant_report.json").exists() and (cli_run / "model" / "config.json").exists()
    assert list((cli_run / "wandb").glob("offline-run-*")), "W&B offline run files"
    assert not list(cli_run.glob("**/*.tmp")), "no temporary files are left behind"
    assert not (cli_run / "failed.json").exists() and (cli_run / "run_config.json").exists()
    log = (cli_run / "run.log").read_text()  # Hydra's log file: plain lines, one summary, no losses
    assert "\r" not in log and "\x1b[" not in log and "train_losses" not in log
    assert log.count("──── run finished") == 1 and f"results     {cli_run / 'results.json'}" in log
    assert len(log.splitlines()) < 60


def test_saved_model_reloads_with_the_same_perplexity(cli_run):
    from lowra.checkpoint import load_quantized

    r = _results(cli_run)
    cfg = r["config"]
    model = load_quantized(cli_run / "model")
    tok = load_tokenizer(_as_cfg(cfg["model"]))
    data = load_data(_as_cfg(cfg["data"]), tok, need_train=False)
    e = cfg["eval"]
    ppl = perplexity(model, data.eval_ids, e["window"], e["stride"], e["max_tokens"], e["batch_size"], progress=False)
    assert ppl["ppl"] == pytest.approx(r["ppl_finetuned"], rel=1e-4)


def _as_cfg(d: dict):
    from omegaconf import OmegaConf

    return OmegaConf.create(d)


class SimulatedCrash(RuntimeError):
    pass


def test_resume_continues_from_the_last_checkpoint(cli_run, tmp_path, monkeypatch):
    """Crash after step 5 (last checkpoint: step 4); ``resume=true`` finishes steps 5–8 and ends
    exactly where the uninterrupted CLI run ended."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir = tmp_path / "run"

    def crash(step: int) -> None:
        if step == 5:
            raise SimulatedCrash(step)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=[*FAST, "logger=none", "eval.fp=false"])
        resumed_cfg = compose(config_name="run", overrides=[*FAST, "logger=none", "eval.fp=false", "resume=true"])
    monkeypatch.setattr(train_module, "STEP_HOOKS", [crash])
    with pytest.raises(SimulatedCrash):
        run(cfg, run_dir)
    ckpt = torch.load(run_dir / "checkpoint" / "last.pt", weights_only=False)
    assert ckpt["step"] == 4 and not (run_dir / "results.json").exists()
    failed = json.loads((run_dir / "failed.json").read_text())  # marked, and says it can be resumed
    assert failed["status"] == "failed" and failed["stage"] == "fine-tune" and failed["resumable"]
    state = json.loads((run_dir / "state.json").read_text())
    assert {"ppl_quantized", "ppl_loftq", "quantize_time_s"} <= set(state)

    monkeypatch.setattr(train_module, "STEP_HOOKS", [])
    r = run(resumed_cfg, run_dir)
    assert r["resumed_from_step"] == 4 and r["train_steps"] == 8
    assert r["quantize_time_s"] == state["quantize_time_s"]  # reloaded, not re-quantized
    assert r["ppl_quantized"] == state["ppl_quantized"]
    full = _results(cli_run)
    assert r["train_losses"] == pytest.approx(full["train_losses"], rel=1e-4)
    assert r["ppl_finetuned"] == pytest.approx(full["ppl_finetuned"], rel=1e-4)
    assert not (run_dir / "failed.json").exists()


def test_hub_dataset_offline_says_how_to_use_local_files(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=["data=wikitext2"])
    tok = load_tokenizer(cfg.model)
    with pytest.raises(DataUnavailableError, match=r"data\.local\.train=/path/to/file"):
        load_data(cfg.data, tok, need_train=True)
    data = load_data(cfg.data, tok, need_train=False)  # evaluation falls back to the local test file
    assert data.eval_ids.numel() > 100_000 and "offline fallback" in data.sources["eval"]


# ------------------------------------------------------------------------------------ notebooks


def _execute(notebook: str, env: dict[str, str]) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO_ROOT / "notebooks" / notebook, as_version=4)
    old = dict(os.environ)
    os.environ.update(env)
    try:
        resources = {"metadata": {"path": str(REPO_ROOT)}}
        client = NotebookClient(nb, timeout=300, kernel_name="python3", resources=resources)
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook draws its figures"


def test_results_notebook_runs_on_a_run_directory(cli_run, tmp_path):
    _execute("results.ipynb", {"LOWRA_RESULTS": str(cli_run.parent), "LOWRA_FIGURES": str(tmp_path)})
    assert (tmp_path / "pareto.png").exists() and (tmp_path / "bit_allocation.png").exists()


def test_channel_distributions_notebook_runs(cli_run, tmp_path):
    _execute("channel_distributions.ipynb", {"LOWRA_FIGURES": str(tmp_path)})
    assert (tmp_path / "channel_distributions.png").exists()


def test_sweep_skips_budgets_a_method_does_not_accept(tmp_path):
    """``-m +bits=2,4 quant=qlora``: QLoRA accepts only 4 bits, so the 2-bit job is skipped."""
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "-m", "+bits=2,4", "quant=qlora", "train.max_steps=0",
         "eval.max_tokens=256", "eval.fp=false", "logger=none", "progress=false", "save_model=false",
         f"hydra.sweep.dir={sweep}"],
        cwd=REPO_ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    (skipped,) = sweep.glob("*_qlora_b2_*/skipped.json")
    assert "not accepted by quant=qlora" in json.loads(skipped.read_text())["reason"]
    (done,) = sweep.glob("*_qlora_b4_*/results.json")
    r = json.loads(done.read_text())
    assert r["method"] == "qlora" and r["bits_nominal"] == 4.0 and r["ppl_finetuned"] is None
    # one table at the end of the sweep (stdout and summary.md): a row per job
    assert "──── sweep finished" in out.stdout
    table = out.stdout.split("──── sweep finished", 1)[1]
    assert "| job | method | bits |" in table and "skipped: quant.bits=2" in table and "| qlora | 4.00 |" in table
    assert (sweep / "summary.md").read_text().count("\n| ") == 3
