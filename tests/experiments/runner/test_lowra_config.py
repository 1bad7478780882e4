"""The Hydra ``quant`` / ``lora`` groups map onto ``lowra.LowRAConfig`` one to one (lowra/config.py
``HYDRA_KEYS``), and the runner quantizes with that config and records it in results.json."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.runner.config_check import CONF_DIR, ConfigError, check_config, group_options
from experiments.runner.setup import lowra_config, quantize_kwargs
from lowra.config import HYDRA_KEYS, INIT_FIELDS, LOWRA_ONLY, LowRAConfig, config_from_arguments

#: keys of conf/quant/*.yaml that are the runner's, not quantize_model's (a preset's name, the
#: budgets it accepts, the recipe of the calibration windows).
RUNNER_ONLY = {"name", "budget_min", "budget_max", "budget_choices", "stream", "options.calibration.samples",
               "options.calibration.seq_len", "options.calibration.seed"}


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


def _budgets(name: str) -> list[float]:
    q = yaml.safe_load((CONF_DIR / "quant" / f"{name}.yaml").read_text())
    if q["method"] == "none":
        return [16.0]
    return [float(b) for b in q["budget_choices"]] if q["budget_choices"] else [1.15, 2.0, 3.5]


def _leaves(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _leaves(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def _hydra_value(cfg, key: str):
    return OmegaConf.select(cfg, key)


@pytest.mark.parametrize("name", group_options("quant"))
def test_every_quant_preset_builds_a_valid_config_one_key_per_field(name):
    for bits in _budgets(name):
        cfg = compose(config_name="run", overrides=[f"quant={name}"] + ([f"+bits={bits}"] if bits != 16 else []))
        check_config(cfg)
        config = lowra_config(cfg)
        assert isinstance(config, LowRAConfig) and config.bits == bits
        assert LowRAConfig.from_dict(config.to_dict()) == config
        method = cfg.quant.method
        for field, key in HYDRA_KEYS.items():
            value = getattr(config, field)
            if field in LOWRA_ONLY and method != "lowra" or field in INIT_FIELDS and method == "none":
                assert value == getattr(LowRAConfig(bits=bits, method=method), field), field  # "unused": default
                continue
            hydra = _hydra_value(cfg, key)
            if field == "quant_options":
                hydra = {k: v for k, v in OmegaConf.to_container(hydra).items() if k != "calibration"}
            elif isinstance(hydra, (list, tuple)) or OmegaConf.is_list(hydra):
                hydra = tuple(hydra)
            if hydra is None and field != "low_bits_init":  # not set by the preset: the dataclass default
                # (low_bits_init: null means no low-bit rule; its default depends on the method)
                hydra = getattr(LowRAConfig(bits=bits, method=method), field)
            assert value == hydra, (name, field, key)
    # every key of the preset is either a field's or the runner's own
    keys = _leaves(yaml.safe_load((CONF_DIR / "quant" / f"{name}.yaml").read_text()))
    mapped = {k.removeprefix("quant.") for k in HYDRA_KEYS.values() if k.startswith("quant.")}
    keys = {next((f for f in mapped - {"options"} if k.startswith(f + ".")), k) for k in keys}  # a mapping field
    options = {k for k in keys if k.startswith("options.") and not k.startswith("options.calibration")}
    assert keys - mapped - RUNNER_ONLY - options - {"options"} == set(), name
    assert {k.removeprefix("options.") for k in options} <= set(lowra_config(
        compose(config_name="run", overrides=[f"quant={name}"] + ([f"+bits={_budgets(name)[0]}"]
                                                                  if _budgets(name)[0] != 16 else []))).quant_options)


def test_mapping_covers_every_field_once():
    fields = [f.name for f in dataclasses.fields(LowRAConfig) if f.name != "method_config"] + list(LOWRA_ONLY)
    assert sorted(HYDRA_KEYS) == sorted(fields)  # the common fields and the method's options, by flat name
    assert len(set(HYDRA_KEYS.values())) == len(HYDRA_KEYS)  # one to one


@pytest.mark.parametrize("name", group_options("quant"))
def test_keyword_form_builds_the_same_config(name):
    """quantize_kwargs (the shortcut form the runner used before) gives the very same LowRAConfig."""
    bits = _budgets(name)[-1]
    cfg = compose(config_name="run", overrides=[f"quant={name}"] + ([f"+bits={bits}"] if bits != 16 else []))
    kw = quantize_kwargs(cfg, progress=False)
    kw.pop("progress")
    config, runtime = config_from_arguments(None, kw)
    assert config == lowra_config(cfg) and not runtime


def test_fields_a_preset_leaves_out_can_be_added_and_bad_values_fail_early():
    cfg = compose(config_name="run", overrides=["quant=lowra_paper", "+quant.budget_scope=matrix",
                                                "+quant.codebook_iters=7", "+quant.plan_options={clusters: 16}",
                                                "lora.rank=4"])
    config = lowra_config(cfg)
    assert (config.budget_scope, config.codebook_iters, config.plan_options, config.rank) == \
        ("matrix", 7, {"clusters": 16}, 4)
    with pytest.raises(ConfigError, match="budget_scope must be 'model' or 'matrix'"):
        check_config(compose(config_name="run", overrides=["+quant.budget_scope=layer"]))
    with pytest.raises(ConfigError, match=r"plan_options: unknown option\(s\) \['scope'\]"):
        check_config(compose(config_name="run", overrides=["+quant.plan_options={scope: matrix}"]))


def test_options_naming_a_field_set_that_field():
    """quant.options are extra quantize_model keywords (conf/README.md): +quant.options.measure_windows=4
    sets the field, not a quantizer option; set twice is an error."""
    cfg = compose(config_name="run", overrides=["+quant.options.measure_windows=4"])
    config = lowra_config(cfg)
    assert config.measure_windows == 4 and "measure_windows" not in config.quant_options
    twice = compose(config_name="run", overrides=["+quant.options.group_size=32"])
    with pytest.raises(ValueError, match="group_size is set twice"):
        lowra_config(twice)
