"""train.distill: the chunked (1−w)·CE + w·T²·KL loss against a hand-computed reference, weight 0
is the old loss exactly, the teacher stays frozen and out of the optimizer and checkpoint, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from experiments.eval.stories import load_model, token_splits
from experiments.runner import train as train_module
from experiments.runner.config_check import CONF_DIR, ConfigError, check_config
from experiments.runner.data import pack_blocks
from experiments.runner.distill import DistillStats, distill_loss, freeze
from experiments.runner.setup import trainable_parameters
from experiments.runner.train import LMBatches, TrainOptions, load_checkpoint, train
from lowra.model_quantization import quantize_model


@pytest.fixture(scope="module")
def teacher():
    return freeze(load_model())


@pytest.fixture(scope="module")
def student():
    """stories260K at 2 bits (data-free LowRA plan, LoftQ adapters): the model train.distill trains."""
    model = load_model()
    quantize_model(model, 2.0, rank=2, alpha=4, codebook_iters=5,
                   plan_options={"clusters": 16, "samples": 0, "max_nodes": 200}, progress=False)
    return model


@pytest.fixture(scope="module")
def blocks():
    train_ids, _ = token_splits()
    return pack_blocks(train_ids[:4096], 64)


def _tcfg(**distill):
    cfg = OmegaConf.load(CONF_DIR / "train" / "default.yaml")
    cfg.seed, cfg.max_steps, cfg.batch_size, cfg.seq_len = 0, 4, 2, 64
    cfg.checkpoint_every, cfg.log_every = 1, 1
    if not distill:
        del cfg["distill"]
    else:
        cfg.distill = distill
    return cfg


def _reference(student, teacher, batch, w, t):
    """The loss from the full logits of both models, written out."""
    z_s = student(input_ids=batch["input_ids"]).logits[:, :-1].double()
    with torch.no_grad():
        z_t = teacher(input_ids=batch["input_ids"]).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    z_s, z_t, labels = z_s[keep], z_t[keep], labels[keep]
    log_q = z_s - torch.logsumexp(z_s, -1, keepdim=True)
    ce = -log_q.gather(1, labels[:, None]).mean()
    log_p_t = z_t / t - torch.logsumexp(z_t / t, -1, keepdim=True)
    log_p_s = z_s / t - torch.logsumexp(z_s / t, -1, keepdim=True)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    return (1 - w) * ce + w * t * t * kl


@pytest.mark.parametrize(("w", "t"), [(0.5, 2.0), (1.0, 1.0), (0.0, 1.0)])
def test_loss_matches_the_hand_computed_reference(student, teacher, blocks, w, t):
    ids = blocks[:2].clone()
    labels = ids.clone()
    labels[0, :10] = -100  # ignored positions drop out of both terms
    batch = {"input_ids": ids, "labels": labels}
    params = list(trainable_parameters(student).values())
    ref = _reference(student, teacher, batch, w, t)
    ref_grads = torch.autograd.grad(ref, params)
    stats = DistillStats()
    loss, parts = distill_loss(student, teacher, batch, w, t, chunk_tokens=7, stats=stats)  # 18 chunks
    grads = torch.autograd.grad(loss, params)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-6)
    assert stats.forwards == 1 and stats.forward_s > 0 and parts["kl"] >= 0
    if w == 0.0:  # the model's own (Hugging Face) loss
        assert loss.item() == pytest.approx(student(**batch).loss.item(), rel=1e-6)


def test_bad_options_are_named(student, teacher, blocks):
    batch = {"input_ids": blocks[:1], "labels": blocks[:1]}
    with pytest.raises(ValueError, match=r"weight=1.5 must be in \[0, 1\]"):
        distill_loss(student, teacher, batch, 1.5, 1.0)
    with pytest.raises(ValueError, match="needs the teacher"):
        train(student, trainable_parameters(student), LMBatches(blocks, 2, 0), CONF_DIR,
              TrainOptions(_tcfg(weight=0.5), progress=False))


@pytest.mark.parametrize(("override", "message"), [
    ("train.distill.weight=2", r"train\.distill\.weight=2 must be a number in \[0, 1\]"),
    ("train.distill.temperature=0", r"train\.distill\.temperature=0"),
    ("train.distill.chunk_tokens=0", r"train\.distill\.chunk_tokens=0 must be a positive integer"),
])
def test_config_check_names_bad_distill_options(override, message):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=["logger=none", override])
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_weight_zero_is_exactly_the_old_loss(student, teacher, blocks, tmp_path):
    """Same steps, same data: no distill key at all vs weight 0 with a teacher → identical runs."""
    start = _snapshot(student)
    runs = []
    for i, tcfg in enumerate([_tcfg(), _tcfg(weight=0.0, temperature=2.0, chunk_tokens=16)]):
        student.load_state_dict(start)
        r = train(student, trainable_parameters(student), LMBatches(blocks, 2, 0), tmp_path / str(i),
                  TrainOptions(tcfg, progress=False, teacher=teacher if i else None))
        runs.append((r.losses, _snapshot(student)))
        assert r.distill is None
    student.load_state_dict(start)
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k]), k


def test_teacher_is_frozen_and_outside_optimizer_and_checkpoint(student, teacher, blocks, tmp_path):
    start, before = _snapshot(student), _snapshot(teacher)
    params = trainable_parameters(student)
    seen: list[set[int]] = []
    real = train_module.make_optimizer

    def spy(name, ps, tcfg):
        seen.append({id(p) for p in ps})
        return real(name, ps, tcfg)

    train_module.make_optimizer = spy
    try:
        r = train(student, params, LMBatches(blocks, 2, 0), tmp_path,
                  TrainOptions(_tcfg(weight=0.5, temperature=2.0, chunk_tokens=32), progress=False, teacher=teacher))
    finally:
        train_module.make_optimizer = real
        student_after = _snapshot(student)
        student.load_state_dict(start)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    assert seen[0] == {id(p) for p in params.values()}
    assert not seen[0] & {id(p) for p in teacher.parameters()}
    ckpt = load_checkpoint(tmp_path)
    assert set(ckpt["params"]) == set(params)  # the adapters only
    assert r.distill["weight"] == 0.5 and r.distill["teacher_forwards"] == 4
    assert any(not torch.equal(start[k], student_after[k]) for k in params)  # the student did train


class _Crash(RuntimeError):
    pass


def test_resume_gives_the_uninterrupted_run(student, teacher, blocks, tmp_path, monkeypatch):
    start = _snapshot(student)
    tcfg = _tcfg(weight=0.7, temperature=2.0, chunk_tokens=50)
    full = train(student, trainable_parameters(student), LMBatches(blocks, 2, 0), tmp_path / "a",
                 TrainOptions(tcfg, progress=False, teacher=teacher))
    full_params = _snapshot(student)
    student.load_state_dict(start)

    def crash(step):
        if step == 2:
            raise _Crash

    monkeypatch.setattr(train_module, "STEP_HOOKS", [crash])
    with pytest.raises(_Crash):
        train(student, trainable_parameters(student), LMBatches(blocks, 2, 0), tmp_path / "b",
              TrainOptions(tcfg, progress=False, teacher=teacher))
    monkeypatch.setattr(train_module, "STEP_HOOKS", [])
    student.load_state_dict(start)  # a fresh process: the init again, then the checkpoint
    other_teacher = freeze(copy.deepcopy(teacher))
    resumed = train(student, trainable_parameters(student), LMBatches(blocks, 2, 0), tmp_path / "b",
                    TrainOptions(tcfg, resume=True, progress=False, teacher=other_teacher))
    resumed_params = _snapshot(student)
    student.load_state_dict(start)
    assert resumed.resumed_from == 2 and resumed.losses == full.losses
    for k, v in full_params.items():
        assert torch.equal(v, resumed_params[k]), k
