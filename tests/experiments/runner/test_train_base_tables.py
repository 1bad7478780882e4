"""train.codebooks / train.scales = trainable through the runner: own rates, no decay, resume restores them."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from experiments.runner.config_check import CONF_DIR, ConfigError, check_config
from experiments.runner.setup import train_base_tables, trainable_parameters
from experiments.runner.train import LMBatches, TrainOptions, param_groups, train
from lowra.format import QuantizedTensor
from lowra.linear import LowRALinear


class _LM(torch.nn.Module):
    """Embedding → a quantized LowRALinear head (1 and 2 bits, group 16)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Embedding(32, 32)
        self.emb.weight.requires_grad_(False)
        w = torch.randn(32, 32, generator=gen)
        bits = torch.tensor([1, 2])[torch.arange(32) % 2]
        books = {1: torch.tensor([[-0.7, 0.7]]), 2: torch.tensor([[-0.9, -0.3, 0.3, 0.9]])}
        self.head = LowRALinear(QuantizedTensor.from_codebooks(w, bits, books, group_size=16), rank=2)

    def forward(self, input_ids, labels):
        logits = self.head(self.emb(input_ids))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), labels[:, 1:].reshape(-1))
        return type("Out", (), {"loss": loss})()


def _tcfg(**kw):
    tcfg = OmegaConf.load(CONF_DIR / "train" / "default.yaml")
    tcfg.seed, tcfg.max_steps, tcfg.warmup_steps, tcfg.checkpoint_every = 0, 3, 0, 1
    tcfg.weight_decay = 0.1
    for k, v in kw.items():
        tcfg[k] = v
    return tcfg


def test_param_groups_put_no_decay_parameters_apart():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    assert param_groups([a, b], None, 0.1, [False, False]) == [a, b]
    groups = param_groups([a, b], [0.1, 0.5], 0.1, [False, True])
    assert groups == [{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.5, "weight_decay": 0.0}]


def test_frozen_default_adds_nothing():
    model = _LM()
    lrs, no_decay = train_base_tables(model, _tcfg())
    assert lrs == {} and no_decay == frozenset()
    assert sorted(trainable_parameters(model)) == ["head.lora_A", "head.lora_B"]


def test_trainable_tables_train_and_resume_restores_them(tmp_path):
    blocks = torch.randint(0, 32, (8, 12), generator=torch.Generator().manual_seed(1))
    tcfg = _tcfg(codebooks="trainable", scales="trainable", codebook_lr=1e-2, scale_lr=1e-3)
    torch.manual_seed(0)
    model = _LM()
    lrs, no_decay = train_base_tables(model, tcfg)
    assert lrs == {"head.trainable_codebooks.0": 1e-2, "head.trainable_codebooks.1": 1e-2,
                   "head.trainable_absmax": 1e-3} and no_decay == frozenset(lrs)
    params = trainable_parameters(model)
    assert set(lrs) < set(params)
    start = {n: params[n].detach().clone() for n in lrs}
    r = train(model, params, LMBatches(blocks, 2, 0), tmp_path,
              TrainOptions(tcfg, progress=False, param_lrs=lrs, no_decay=no_decay))
    assert r.steps == 3
    for n in lrs:
        assert not torch.equal(start[n], params[n])
    torch.manual_seed(0)
    again = _LM()
    lrs2, no_decay2 = train_base_tables(again, tcfg)
    params2 = trainable_parameters(again)
    train(again, params2, LMBatches(blocks, 2, 0), tmp_path,
          TrainOptions(tcfg, resume=True, progress=False, param_lrs=lrs2, no_decay=no_decay2))
    for n in lrs:
        assert torch.equal(params2[n], params[n]), n
    assert torch.equal(again.head.qweight.groups[0].codebook, model.head.qweight.groups[0].codebook)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="run", overrides=overrides)


def test_config_check_validates_the_options():
    cfg = compose(["train.codebooks=trainable", "train.scales=trainable"])
    check_config(cfg)
    for override, match in (("train.codebooks=yes", "train.codebooks"), ("train.codebook_lr=0", "codebook_lr")):
        bad = compose(["train.codebooks=trainable", override] if "lr" in override else [override])
        with pytest.raises(ConfigError, match=match):
            check_config(bad)
    with pytest.raises(ConfigError, match="double_quant"):
        check_config(compose(["train.scales=trainable", "quant.double_quant=true"]))
