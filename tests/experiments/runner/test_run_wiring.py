"""Issue 7 wiring through the runner: ModuLoRA (OPTQ + calibration), LowRA ablations, the QLoRA
optimizer and sweep directories of quant=lora."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.runner.config_check import CONF_DIR, REPO_ROOT, BudgetError, ConfigError, check_config
from experiments.runner.run import run
from experiments.runner.setup import quantize_kwargs
from experiments.runner.train import resolve_optimizer
from lowra.methods import METHODS

SMALL = ["train.max_steps=3", "train.batch_size=2", "train.seq_len=64", "eval.max_tokens=512", "logger=none",
         "progress=false", "save_model=false"]


def _compose(overrides: list[str], hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="run", overrides=overrides, return_hydra_config=hydra_config)


def test_modulora_kwargs_do_not_forward_the_calibration_recipe():
    cfg = _compose(["quant=modulora", "+bits=3"])
    check_config(cfg)
    kw = quantize_kwargs(cfg, progress=False)
    assert "calibration" not in kw and kw["method"] == "optq" and kw["bits"] == 3.0
    assert {"damp", "act_order", "block_size", "grid"} <= set(kw)
    assert "codebook" not in kw and "plan" not in kw  # LowRA-only switches
    assert cfg.quant.options.calibration.samples == 256  # the recipe itself is untouched


def test_modulora_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _compose(["quant=modulora", "+bits=3", *SMALL, "quant.options.calibration.samples=32",
                    "quant.options.calibration.seq_len=128"])
    r = run(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["bits_nominal"] == 3
    assert r["method"] == "modulora" and r["quant_method"] == "optq" and r["bits_nominal"] == 3
    for key in ("ppl_fp", "ppl_quantized", "ppl_finetuned"):
        assert math.isfinite(r[key]), key
    assert r["ppl_loftq"] is None and r["train_steps"] == 3 and r["optimizer"] == "adamw"
    assert r["ppl_quantized"] > r["ppl_fp"]


@pytest.mark.parametrize("overrides", [
    ["quant.codebook=nf"], ["quant.plan=uniform", "+bits=2"], ["quant.loftq_iters=0"], ["quant.weight_power=1"],
    ["quant.candidates=[1,2,3,4]"], ["quant.group_size=32"],
])
def test_lowra_ablations_compose_and_reach_quantize_model(overrides):
    cfg = _compose(overrides)
    check_config(cfg)
    kw = quantize_kwargs(cfg, progress=False)
    key, _, value = overrides[0].partition("=")
    key = key.removeprefix("quant.")
    expected = {"codebook": "nf", "plan": "uniform", "loftq_iters": 0, "weight_power": 1.0,
                "candidates": (1, 2, 3, 4), "group_size": 32}[key]
    assert kw[key] == expected
    assert set(METHODS["lowra"].ablations) >= {"codebook=nf", "plan=uniform", "loftq_iters=0"}


def test_lowra_defaults_keep_current_behaviour():
    kw = quantize_kwargs(_compose([]), progress=False)
    assert (kw["codebook"], kw["plan"], kw["weight_power"]) == ("learned", "ilp", 2.0)


def test_bad_ablation_values_fail_early():
    with pytest.raises(ConfigError, match="quant.codebook"):
        check_config(_compose(["quant.codebook=kmeans"]))
    with pytest.raises(ConfigError, match="quant.plan"):
        check_config(_compose(["quant.plan=greedy"]))
    with pytest.raises(BudgetError, match="plan='uniform'"):
        check_config(_compose(["quant.plan=uniform", "+bits=1.5"]))


def test_optimizer_choice():
    assert resolve_optimizer("auto", "qlora", "cpu") == "adamw"
    assert resolve_optimizer(None, "lowra", "cpu") == "adamw"
    assert resolve_optimizer("auto", "my_custom_quant", "cpu") == "adamw"
    assert resolve_optimizer("adamw", "qlora", "cuda") == "adamw"  # an explicit train.optimizer wins
    with pytest.warns(RuntimeWarning, match="paged_adamw_8bit"):
        assert resolve_optimizer("paged_adamw_8bit", "qlora", "cpu") == "adamw"
    for name in ("auto", "adamw", "paged_adamw_8bit"):
        check_config(_compose([f"train.optimizer={name}"]))
    with pytest.raises(ConfigError, match="train.optimizer"):
        check_config(_compose(["train.optimizer=sgd"]))


def test_qlora_run_records_the_optimizer(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _compose(["quant=qlora", "+bits=4", *SMALL, "train.max_steps=2", "eval.fp=false"])
    r = run(cfg, tmp_path / "run")
    assert r["optimizer"] == "adamw" and r["train_steps"] == 2


def test_sweep_subdir_uses_the_requested_budget():
    subdirs = set()
    for bits in (2, 4):
        for quant in ("lora", "lowra"):
            cfg = _compose([f"+bits={bits}", f"quant={quant}"], hydra_config=True)
            subdirs.add(OmegaConf.select(cfg, "hydra.sweep.subdir"))
    assert len(subdirs) == 4 and any("_lora_b2_" in s for s in subdirs)
    cfg = _compose(["quant=lora"], hydra_config=True)  # no +bits: the quant option's own budget
    assert "_lora_b16_" in OmegaConf.select(cfg, "hydra.sweep.subdir")


def test_lora_sweep_writes_one_directory_per_budget(tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "-m", "+bits=2,4", "quant=lora", "train.max_steps=0",
         "eval.max_tokens=256", "eval.fp=false", "logger=none", "progress=false", "save_model=false",
         f"hydra.sweep.dir={sweep}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert len(list(sweep.glob("*_lora_b2_*/results.json"))) == 1
    assert len(list(sweep.glob("*_lora_b4_*/results.json"))) == 1
