"""The runner's pieces on real data: story split, token stream, windows, perplexity, ROUGE, schedule."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from experiments.eval.evaluate import make_windows, perplexity, rouge
from experiments.runner.config_check import resolve_path
from experiments.runner.data import pack_blocks, split_heldout, split_stories, tokenize_stream
from experiments.runner.logging_utils import atomic_write_json, rows_by_layer_type
from experiments.runner.train import LMBatches, lr_factor

ASSETS = resolve_path("../shared/assets")
MODEL_DIR = ASSETS / "models" / "stories260K"
STORIES = ASSETS / "corpora" / "tinystories_valid.txt"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval(), AutoTokenizer.from_pretrained(MODEL_DIR)


def test_story_split_is_deterministic_and_disjoint():
    stories = split_stories(STORIES.read_text())
    assert len(stories) > 4000 and all("\n\n" not in s for s in stories)
    train, heldout = split_heldout(stories, 0.1)
    assert len(heldout) == math.ceil(0.1 * len(stories)) and train + heldout == stories
    assert split_heldout(split_stories(STORIES.read_text()), 0.1)[1] == heldout


def test_token_stream_starts_each_story_with_bos(model_and_tokenizer):
    _, tok = model_and_tokenizer
    stream = tokenize_stream(tok, ["Once upon a time.", "The end."], join=None, add_eos=False)
    assert stream.dtype == torch.long and int((stream == tok.bos_token_id).sum()) == 2 and stream[0] == tok.bos_token_id
    joined = tokenize_stream(tok, ["a", "b"], join="\n\n", add_eos=True)
    assert int((joined == tok.bos_token_id).sum()) == 1 and joined[-1] == tok.eos_token_id
    blocks = pack_blocks(torch.arange(10), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize(("n", "window", "stride"), [(1000, 256, 256), (1000, 256, 100), (300, 256, 256), (2, 8, 8)])
def test_windows_score_each_token_at_most_once(n, window, stride):
    windows = make_windows(n, window, stride)
    scored = [t for w in windows for t in range(w.first_target, w.end)]
    if stride < window:  # overlapping windows: every token after the first is scored once
        assert scored == list(range(1, n))
    else:  # disjoint windows: the first token of each window is context only
        assert scored == [t for t in range(1, n) if t % window]
    assert all(w.end - w.begin <= window and w.begin < w.first_target for w in windows)


def test_perplexity_is_token_weighted_and_matches_hf_loss(model_and_tokenizer):
    model, tok = model_and_tokenizer
    stories = split_stories(STORIES.read_text())[-20:]
    stream = tokenize_stream(tok, stories, join=None, add_eos=False)[:512]
    with torch.no_grad():
        losses = [float(model(input_ids=c[None], labels=c[None]).loss) for c in stream.view(2, 256)]
    got = perplexity(model, stream, window=256, stride=256, batch_size=2, progress=False)
    assert got["tokens"] == 2 * 255 and got["windows"] == 2
    assert got["ppl"] == pytest.approx(math.exp(sum(losses) / 2), rel=1e-5)
    overlapping = perplexity(model, stream, window=256, stride=128, batch_size=3, progress=False)
    assert overlapping["tokens"] == 511 and overlapping["ppl"] == pytest.approx(got["ppl"], rel=0.1)


def test_rouge_scores():
    assert rouge(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(
        {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    )
    partial = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert 0 < partial["rouge2"] < partial["rouge1"] < 100


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, warmup=10, total=100, kind="cosine") for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False)) and f[-1] < 0.01
    assert lr_factor(50, 10, 100, "constant") == 1.0 and lr_factor(55, 10, 100, "linear") == pytest.approx(0.5)


def test_batches_are_a_pure_function_of_seed_and_index():
    blocks = torch.arange(40).view(10, 4)
    a, b = LMBatches(blocks, 3, seed=1), LMBatches(blocks, 3, seed=1)
    assert a.per_epoch == 3
    assert torch.equal(a.get(4)["input_ids"], b.get(4)["input_ids"])
    epoch0 = torch.cat([a.get(i)["input_ids"][:, 0] for i in range(3)])
    assert len(set(epoch0.tolist())) == 9  # no block repeats within an epoch


def test_atomic_json_and_bit_pooling(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"x": torch.tensor(1.5)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 1.5}
    assert not list(tmp_path.glob(".*tmp"))
    pooled = rows_by_layer_type({"l.0.q_proj": {1: 3, 4: 1}, "l.1.q_proj": {4: 2}, "l.0.down_proj": {2: 5}})
    assert pooled == {"q_proj": {1: 3, 4: 3}, "down_proj": {2: 5}}
