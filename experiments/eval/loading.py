"""The model the harness evaluates, its tokenizer and a description for the results JSON.

:func:`load_checkpoint` is the ONE place the evaluation reads a saved model (a LowRA checkpoint or
any Hugging Face model folder); :func:`load_for_eval` alternatively composes the runner's Hydra
config and loads + quantizes the model exactly as ``experiments.runner.run`` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experiments.eval.tasks import REPO_ROOT


def load_checkpoint(directory: str | os.PathLike, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A saved quantized + adapted model: the ONE place the evaluation reads checkpoints.

    A ``lowra.save_quantized`` directory (``lowra.is_checkpoint``; a folder of the removed version-1
    layout is refused by ``lowra.load_quantized`` with how to convert it) goes through
    ``lowra.load_quantized``; any other Hugging Face model folder
    (``config.json``) through ``AutoModelForCausalLM.from_pretrained``.
    """
    import lowra

    path = Path(directory)
    if lowra.is_checkpoint(path):  # LowRA folders (load_quantized refuses the removed version-1 layout, saying why)
        return lowra.load_quantized(str(path), device=str(device))
    if (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path))
        return model.to(device).eval()
    raise ValueError(f"--checkpoint {path}: neither a LowRA checkpoint nor a Hugging Face model "
                     f"folder (config.json)")


def load_tokenizer_from(where: str) -> Any:
    """``AutoTokenizer.from_pretrained(where)`` (a local path, or a Hub id read from the cache when offline)."""
    from transformers import AutoTokenizer

    from experiments.runner.hub import hub_access

    with hub_access("local" if Path(where).exists() else "hub"):
        try:
            return AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError) as exc:
            raise ValueError(f"could not load the tokenizer from {where!r} ({type(exc).__name__}: {exc}); "
                             f"pass --tokenizer") from exc


def _saved_options(model: torch.nn.Module) -> dict[str, Any]:
    """What a loaded checkpoint records about itself: its HF quantization_config's options and source model."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    options = dict(getattr(qc, "options", None) or {})
    return {**options, "source_model": getattr(qc, "source_model", None)}


def _checkpoint_tokenizer_location(path: Path, model: torch.nn.Module) -> str:
    """The checkpoint's own tokenizer files, else the source model recorded in it."""
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return str(path)
    manifest = _saved_options(model)
    where = manifest.get("source_model") or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not where:
        raise ValueError(f"{path}: no tokenizer in the checkpoint and no source model recorded; pass --tokenizer")
    return str(where)


def bits_of(model: torch.nn.Module) -> dict[str, float | None]:
    """Nominal and effective bits per weight over the quantized layers (parameter-weighted); None if dense."""
    from lowra.model_layers import lowra_layers

    layers = [m for _, m in lowra_layers(model) if m.is_quantized]
    total = sum(m.in_features * m.out_features for m in layers)
    if not total:
        return {"bits_nominal": None, "bits_effective": None}
    return {k: sum(getattr(m, attr) * m.in_features * m.out_features for m in layers) / total
            for k, attr in (("bits_nominal", "nominal_bits"), ("bits_effective", "effective_bits"))}


def load_for_eval(
    checkpoint: str | None, overrides: Sequence[str], device: torch.device, fp: bool = False,
    tokenizer: str | None = None,
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """The model to evaluate, its tokenizer and a description (name, method, bits) for the JSON.

    ``checkpoint``: :func:`load_checkpoint` (quantized base + adapters as saved, e.g. a fine-tuned
    ``<run_dir>/model``). Otherwise the runner's Hydra config (``conf/run.yaml`` + ``overrides``)
    is composed and the model is loaded and quantized exactly as ``experiments.runner.run`` does (LoftQ
    adapters initialised, no fine-tuning); ``fp``: skip quantization (the full-precision baseline).
    """
    if checkpoint is not None:
        if overrides:
            raise ValueError(f"give either --checkpoint or Hydra overrides, not both (got {list(overrides)})")
        path = Path(checkpoint)
        model = load_checkpoint(path, device)
        tok_from = tokenizer or _checkpoint_tokenizer_location(path, model)
        tok = load_tokenizer_from(tok_from)
        manifest = _saved_options(model)
        source = manifest.get("source_model")  # the model's name, not the run's timestamp folder
        name = Path(str(source).rstrip("/")).name if source else (path.name if path.name != "model" else "model")
        info = {"name": name, "source": str(path.resolve()),
                "tokenizer": tok_from, "method": manifest.get("method"), "bits_target": manifest.get("bits")}
        return model, tok, {**info, **bits_of(model)}

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from experiments.runner.config_check import check_config
    from experiments.runner.data import load_data
    from experiments.runner.setup import (
        calibration_kwargs,
        load_model,
        load_tokenizer,
        model_location,
        needs_calibration,
        quantize_kwargs,
    )

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="run", overrides=list(overrides))
    check_config(cfg)
    OmegaConf.resolve(cfg)
    tok = load_tokenizer(cfg.model) if tokenizer is None else load_tokenizer_from(tokenizer)
    model = load_model(cfg.model, device)
    info: dict[str, Any] = {"name": str(cfg.model.name), "source": model_location(cfg.model),
                            "tokenizer": tokenizer or model_location(cfg.model), "overrides": list(overrides)}
    from lowra.methods import method_of

    if fp or not method_of(str(cfg.quant.method)).quantizes and int(cfg.quant.loftq_iters) == 0:
        return model, tok, {**info, "method": "fp" if fp else str(cfg.quant.name), "bits_target": None,
                            "bits_nominal": None, "bits_effective": None}
    kwargs = quantize_kwargs(cfg, progress=False)
    if needs_calibration(cfg):
        kwargs.update(calibration_kwargs(cfg, load_data(cfg.data, tok, need_train=True)))
    torch.manual_seed(int(cfg.seed))
    from lowra import quantize_model

    report = quantize_model(model, **kwargs)
    model.eval()
    return model, tok, {**info, "method": str(cfg.quant.name), "bits_target": float(cfg.quant.bits),
                        "bits_nominal": report.bits_nominal, "bits_effective": report.bits_effective}
