"""experiments.runner.logging_utils: the W&B bit-allocation table (against a recording fake run)."""

from __future__ import annotations

import pytest

from experiments.runner.logging_utils import WandbLogger


class _FakeRun:
    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log(self, data: dict) -> None:
        self.logged.append(data)


def _logger() -> WandbLogger:
    wandb = pytest.importorskip("wandb")
    logger = WandbLogger.__new__(WandbLogger)  # no wandb.init: only the table building is tested
    logger.wandb, logger.run = wandb, _FakeRun()
    return logger


def test_per_layer_table_has_a_column_for_every_width():
    logger = _logger()
    per_layer = {"model.layers.0.mlp.down_proj": {1: 10, 2: 20, 3: 30, 4: 4},
                 "model.layers.0.self_attn.q_proj": {3: 64}}
    logger.log_bit_allocation(per_layer)
    (data,) = logger.run.logged
    table = data["bits/per_layer"]
    assert table.columns == ["layer", "type", "rows", "mean_bits", "rows_1b", "rows_2b", "rows_3b", "rows_4b"]
    rows = {r[0]: r for r in table.data}
    assert rows["model.layers.0.mlp.down_proj"][4:] == [10, 20, 30, 4]
    assert rows["model.layers.0.self_attn.q_proj"][2:] == [64, 3.0, 0, 0, 64, 0]
    assert data["bits/q_proj/mean"] == 3.0
