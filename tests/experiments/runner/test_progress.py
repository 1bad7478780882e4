"""experiments.runner.progress: bars only on a terminal, a few plain lines otherwise (and in training)."""

from __future__ import annotations

import io
import logging

import torch
from omegaconf import OmegaConf

from experiments.runner import progress as progress_module
from experiments.runner.config_check import CONF_DIR
from experiments.runner.progress import PlainProgress, is_terminal, progress_bar, progress_iter
from experiments.runner.train import LMBatches, TrainOptions, train


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_on_a_terminal(monkeypatch):
    assert not is_terminal(io.StringIO()) and is_terminal(_Tty())
    monkeypatch.setattr(progress_module.sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(10, "x"), PlainProgress)
    monkeypatch.setattr(progress_module.sys, "stderr", _Tty())
    from tqdm import tqdm

    bar = progress_bar(10, "x")
    assert isinstance(bar, tqdm)
    bar.close()


def test_plain_progress_logs_about_ten_lines(caplog):
    caplog.set_level(logging.INFO, logger="experiments.runner.progress")
    bar = PlainProgress(1000, "fine-tune")
    for _ in range(1000):
        bar.update(1)
        bar.set_postfix(loss="1.0")
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and lines[-1].startswith("fine-tune: 1000/1000 (100%) loss=1.0")
    assert "left" in lines[0] and all("\r" not in m and "\x1b" not in m for m in lines)
    caplog.clear()
    assert list(progress_iter(range(5), "eval", enabled=False)) == [0, 1, 2, 3, 4] and not caplog.records


def test_training_off_a_terminal_writes_lines_not_bars(capsys, caplog, tmp_path):
    """The fine-tune loop's output in a log file: no carriage returns or escape codes, a line per 10 %."""
    caplog.set_level(logging.INFO, logger="experiments.runner.progress")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(32, 8), torch.nn.Linear(8, 32))

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, input_ids, labels):
            logits = self.net(input_ids)
            return type("Out", (), {"loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())})

    lm = LM()
    tcfg = OmegaConf.load(CONF_DIR / "train" / "default.yaml")
    tcfg.seed, tcfg.optimizer = 0, "adamw"
    tcfg.max_steps, tcfg.log_every, tcfg.checkpoint_every, tcfg.grad_accum = 20, 5, 100, 1
    blocks = torch.randint(0, 32, (64, 16), generator=torch.Generator().manual_seed(0))
    result = train(lm, dict(lm.named_parameters()), LMBatches(blocks, 4, 0), tmp_path,
                   TrainOptions(tcfg, progress=True))
    assert result.steps == 20
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fine-tune:")]
    assert len(lines) == 10 and lines[-1].startswith("fine-tune: 20/20 (100%)")


def test_eta_after_a_resume_counts_only_this_sessions_steps(caplog, monkeypatch):
    """Issue 32: resumed at step 100 of 200, a first step of 60 s (warm-up: kernels compiled) then
    0.5 s per step: the ETA is the remaining steps at this session's steady rate, not ~6000 s."""
    clock = iter([0.0] + [60.0 + 0.5 * i for i in range(200)])
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="experiments.runner.progress")
    bar = PlainProgress(200, "fine-tune", initial=100)
    for _ in range(20):
        bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    # the 60-s first step makes a line (30-s interval) without an ETA (it used to say ~5940 s left)
    assert lines[0] == "fine-tune: 101/200 (50%) · 60.0 s", lines
    assert lines[1] == "fine-tune: 120/200 (60%) · 69.5 s, ~40 s left", lines  # 80 steps × 0.5 s
