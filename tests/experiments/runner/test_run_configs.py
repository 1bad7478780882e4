"""Every config composes (all model × data × quant combinations) and bad configs fail early."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from experiments.runner.config_check import CONF_DIR, REPO_ROOT, ConfigError, check_config, group_options

MODELS = ["bart_large", "llama2_13b", "llama2_7b", "llama_33b", "mistral7b", "smollm2_135m", "stories260k"]
DATA = ["cnn_dailymail", "oasst1", "tinystories", "wikitext2", "xsum"]


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    """One Hydra initialization for the module (initializing per compose is slow)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


def _compose(overrides: list[str]):
    return compose(config_name="run", overrides=overrides)


def test_groups_have_the_issue_options():
    assert group_options("model") == MODELS
    assert group_options("data") == DATA
    assert "lowra" in group_options("quant")
    assert {"wandb", "none"} <= set(group_options("logger"))


@pytest.mark.parametrize("group", ["model", "data", "quant", "train", "logger", "eval"])
def test_every_file_of_a_group_sets_the_same_keys(group):
    files = sorted((CONF_DIR / group).glob("*.yaml"))
    keys = {f.stem: set(yaml.safe_load(f.read_text())) for f in files}
    first = next(iter(keys.values()))
    assert all(k == first for k in keys.values()), keys


def test_inline_default_model_equals_its_file():
    inline = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "run.yaml").model)
    from_file = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "stories260k.yaml"))
    assert inline == from_file


def _bits_for(quant: str) -> float:
    """A budget the quant option accepts (a baseline may accept only some budgets)."""
    choices = yaml.safe_load((CONF_DIR / "quant" / f"{quant}.yaml").read_text())["budget_choices"]
    return float(choices[-1]) if choices else 2.0


def test_compose_all_model_data_quant_combinations():
    """Each option is composed by Hydra once; every model × data × quant combination is then the
    same merge Hydra performs (the groups own disjoint packages), resolved and validated."""
    base = _compose([])
    OmegaConf.set_struct(base, False)
    models = {m: _compose([f"+model={m}"]).model for m in MODELS}
    datas = {d: _compose([f"data={d}"]).data for d in DATA}
    quants = {q: _compose([f"quant={q}"]).quant for q in group_options("quant")}
    checked = rejected = 0
    for model, data, quant in itertools.product(models, datas, quants):
        bits = _bits_for(quant)
        cfg = OmegaConf.merge(base, {"model": models[model], "data": datas[data], "quant": quants[quant]})
        cfg.bits = bits
        OmegaConf.resolve(cfg)  # every interpolation resolves
        assert cfg.model.name == model and cfg.data.name == data and cfg.quant.name == quant
        assert float(cfg.quant.bits) == bits
        assert cfg.lora.rank == cfg.model.lora_rank
        if model == "bart_large" and cfg.data.task != "summarization":
            with pytest.raises(ConfigError, match="seq2seq"):
                check_config(cfg)
            rejected += 1
        elif cfg.model.source == "local" and not Path(cfg.model.pretrained).expanduser().exists():
            # a cache-prepared model (smollm2_135m) before `make assets`: the error says how to fix it
            with pytest.raises(ConfigError, match="make assets"):
                check_config(cfg)
            rejected += 1
        else:
            check_config(cfg)
            checked += 1
    assert checked > rejected > 0


@pytest.mark.parametrize(
    ("model", "data", "quant"),
    [
        ("llama2_7b", "wikitext2", "lowra"), ("mistral7b", "oasst1", "qlora"), ("bart_large", "xsum", "loftq"),
        ("llama_33b", "wikitext2", "lowra"), ("bart_large", "cnn_dailymail", "lowra"),
        ("stories260k", "tinystories", "lora"),
    ],
)
def test_hydra_composes_a_combination(model, data, quant):
    assert quant in group_options("quant"), f"conf/quant/{quant}.yaml is missing"
    bits = _bits_for(quant)
    cfg = _compose([f"+model={model}", f"data={data}", f"quant={quant}", f"+bits={bits:g}"])
    assert (cfg.model.name, cfg.data.name, cfg.quant.name, float(cfg.quant.bits)) == (model, data, quant, bits)
    check_config(cfg)


def test_default_run_is_stories260k_on_local_assets():
    cfg = _compose([])
    check_config(cfg)
    assert cfg.model.name == "stories260k" and cfg.data.name == "tinystories"
    assert cfg.quant.bits == 2.0 and cfg.lora.rank == 2 and cfg.lora.alpha == 4
    assert len(cfg.model.target_modules) == 7
    assert Path(cfg.model.pretrained).name == "stories260K"
    assert cfg.logger.name == "wandb" and cfg.logger.mode == "offline"


@pytest.mark.parametrize("bits", ["1.15", "1.5", "2", "2.5", "3", "4"])
def test_plus_bits_sets_quant_bits(bits):
    cfg = _compose([f"+bits={bits}", "train.max_steps=3", "logger=none"])
    assert float(cfg.quant.bits) == float(bits) and cfg.train.max_steps == 3
    check_config(cfg)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["+bits=5"], r"quant\.bits=5 is out of range for quant=lowra: accepted 1 ≤ bits ≤ 4"),
        (["+bits=0.5"], r"quant\.bits=0\.5 is out of range"),
        (["model.pretrained=/nonexistent/model"], r"model\.pretrained='/nonexistent/model': no such file"),
        (["data.local.eval=/nonexistent.txt"], r"data\.local\.eval='/nonexistent\.txt'"),
        (["quant.method=gptq9"], r"quant\.method='gptq9' is not one of \['lowra', 'nf'"),
        (["train.scheduler=step"], r"train\.scheduler='step' is not one of \['cosine', 'linear', 'constant'\]"),
        (["train.seq_len=1024"], r"train\.seq_len=1024 exceeds model\.max_length=512"),
        (["eval.stride=512", "eval.window=256"], r"eval\.stride=512 must be ≤ eval\.window=256"),
        (["+model=bart_large"], r"model=bart_large is a seq2seq model.*\['cnn_dailymail', 'xsum'\]"),
    ],
)
def test_bad_config_names_the_key_and_choices(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_config(_compose(overrides))


def test_missing_cached_model_names_make_assets(tmp_path, monkeypatch):
    """+model=smollm2_135m reads $LOWRA_CACHE; an empty cache fails before loading anything."""
    monkeypatch.setenv("LOWRA_CACHE", str(tmp_path))
    cfg = _compose(["+model=smollm2_135m"])
    assert cfg.model.pretrained == f"{tmp_path}/models/SmolLM2-135M-Instruct"
    assert cfg.lora.rank == 8 and len(cfg.model.target_modules) == 7 and cfg.data.name == "tinystories"
    with pytest.raises(ConfigError, match=r"model\.pretrained=.*SmolLM2-135M-Instruct.*`make assets`"):
        check_config(cfg)


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(MissingConfigException, match="stories260k"):
        _compose(["+model=nope"])


def test_cli_bad_budget_fails_fast_with_the_key(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "+bits=7", "logger=none", f"hydra.run.dir={tmp_path}/run"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "quant.bits=7 is out of range for quant=lowra" in out.stderr + out.stdout
    assert not (tmp_path / "run" / "results.json").exists()
    # no model was loaded, nothing was quantized: the run's log holds the refusal and nothing before it
    logged = [line for line in (tmp_path / "run" / "run.log").read_text().splitlines() if line.strip()]
    assert logged and all("quant.bits=7 is out of range" in line for line in logged), logged
