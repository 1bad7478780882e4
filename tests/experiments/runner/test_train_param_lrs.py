"""train(TrainOptions(param_lrs=…)): named parameters with their own learning rate, scheduled like the rest."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from experiments.runner.config_check import CONF_DIR
from experiments.runner.train import LMBatches, TrainOptions, param_groups, train


class _LM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(16, 4)
        self.head = torch.nn.Linear(4, 16)

    def forward(self, input_ids, labels):
        logits = self.head(self.emb(input_ids))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 16), labels[:, 1:].reshape(-1))
        return type("Out", (), {"loss": loss})()


def test_groups_by_rate():
    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    assert param_groups([a, b], None, 0.1) == [a, b]
    assert param_groups([a, b], [0.1, 0.1], 0.1) == [a, b]
    groups = param_groups([a, b, c], [0.1, 0.5, 0.1], 0.1)
    assert [g["lr"] for g in groups] == [0.1, 0.5] and groups[0]["params"] == [a, c]


def test_each_parameter_moves_at_its_rate(tmp_path):
    """Adam's first step moves every element by ≈ its lr (|update| = lr · |g| / (|g| + eps))."""
    torch.manual_seed(0)
    model = _LM()
    tcfg = OmegaConf.load(CONF_DIR / "train" / "default.yaml")
    tcfg.seed, tcfg.max_steps, tcfg.warmup_steps, tcfg.scheduler, tcfg.max_grad_norm = 0, 1, 0, "constant", None
    tcfg.lr = 1e-3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    blocks = torch.randint(0, 16, (8, 12), generator=torch.Generator().manual_seed(1))
    r = train(model, dict(model.named_parameters()), LMBatches(blocks, 2, 0), tmp_path,
              TrainOptions(tcfg, progress=False, param_lrs={"head.weight": 1e-2}))
    assert r.steps == 1
    step = {n: (p.detach() - before[n]).abs() for n, p in model.named_parameters()}
    moved = step["head.weight"][step["head.weight"] > 0]
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-2), rtol=1e-3, atol=1e-6)
    moved = step["emb.weight"][step["emb.weight"] > 0]
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-3), rtol=1e-3, atol=1e-6)
