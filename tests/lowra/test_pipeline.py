"""The named stages of quantize_model (lowra/pipeline.py, lowra/layer_quantization.py), one at a time."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowra import pipeline
from lowra.config import PAPER, LowRAConfig
from lowra.layer_quantization import quantize_layers
from lowra.model_quantization import quantize_model

FAST_PLAN = {"clusters": 8, "samples": 0, "max_nodes": 200}


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 8))


def _settings(**over):
    kw = dict(bits=2.0, rank=2, alpha=4.0, group_size=16, codebook_iters=5, plan_options=FAST_PLAN, **PAPER)
    kw.update(over)
    return pipeline.resolve_settings(LowRAConfig(**kw), progress=False)


def test_resolve_settings_derives_what_the_run_needs():
    settings = _settings()
    assert settings.with_plan and not settings.stats_needed and not settings.needs_calibration
    u = _settings(plan="uniform", bits=3.0)
    assert not u.use_plan and u.candidates == (1, 2, 3, 4)  # the integer budget joins the candidates
    assert _settings(codebook="nf").codebook_iters == 0  # the NormalFloat start of the Lloyd-Max fit
    assert _settings(rank=0).loftq_iters == 0
    f = _settings(error="fisher", init="calibrated")
    assert f.needs.fisher and f.calibrated_init and f.stats_needed
    assert _settings(method="optq", bits=3.0).needs_calibration
    with pytest.raises(ValueError, match="codebook must be"):
        _settings(codebook="kmeans")
    with pytest.raises(ValueError, match="quant.error must be one of"):
        _settings(error="l2")
    with pytest.raises(ValueError, match="fractional budget"):
        _settings(plan="uniform", bits=2.5)
    with pytest.raises(ValueError, match="rank must be a non-negative integer"):
        _settings(rank=-1)
    with pytest.raises(ValueError, match="unknown"):
        _settings(method="no_such_quantizer")


def test_stages_by_hand_equal_quantize_model():
    """Chaining the stages by hand gives quantize_model's model bit for bit (it only chains them)."""
    ref = _toy()
    rep = quantize_model(ref, 1.5, rank=2, alpha=4, group_size=16, codebook_iters=5, plan_options=FAST_PLAN, **PAPER,
                         progress=False)
    model = _toy()
    settings = _settings(bits=1.5)
    targets = pipeline.find_targets(model, settings)
    assert [n for n, _ in targets] == ["0", "2", "4"]
    calib = pipeline.calibrate(model, targets, settings, None)
    assert not calib.ran and not calib.fisher
    report = pipeline.new_report(settings, targets, calib)
    tables = pipeline.error_tables(model, targets, settings, calib, None, report)
    assert [tuple(e.shape) for e in tables.errors] == [(48, 3), (64, 3), (8, 3)]
    assert all(bool((e[:, :-1] >= e[:, 1:]).all()) for e in tables.errors)  # SSE falls with the width
    layer_bits = pipeline.plan_precision(targets, tables, settings, report)
    assert set(layer_bits) == {"0", "2", "4"} and report.plan["average_bits"] <= 1.5
    layers = quantize_layers(model, targets, settings, layer_bits, tables.codebooks, calib, report)
    out = pipeline.finish_report(model, settings, report, layers, 0.0)
    assert out is model.lowra_report and model.lowra_config is settings.config
    assert out.config == rep.config == settings.config.to_dict()
    assert out.bits_nominal == rep.bits_nominal and out.total_sse == rep.total_sse
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)


def test_find_targets_checks_weights_and_rank():
    model = _toy()
    with torch.no_grad():
        model[2].weight[1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"layer '2' weight has 1 NaN/Inf"):
        pipeline.find_targets(model, _settings())
    with pytest.raises(ValueError, match=r"layer '0' \(48, 64\) is too small for rank 50"):
        pipeline.find_targets(_toy(), _settings(rank=50))


def test_calibration_unused_by_the_method_warns():
    model = _toy()
    settings = _settings()
    with pytest.warns(RuntimeWarning, match="does not use calibration data"):
        pipeline.calibrate(copy.deepcopy(model), pipeline.find_targets(model, settings), settings,
                           torch.zeros(2, 8, dtype=torch.int64))
