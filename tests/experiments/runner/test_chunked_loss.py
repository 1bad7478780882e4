"""model.loss_chunk_tokens and model.gradient_checkpointing on stories260K at 2 bits: the chunked
cross-entropy (train) and per-token NLL (eval) equal the model's own within fp32 rounding and never
hold a ``[tokens, vocab]`` tensor for the backward; non-reentrant checkpointing through the LowRA
layers' eager autograd path gives the same gradients and keeps less for the backward."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from experiments.eval.evaluate import perplexity
from experiments.eval.stories import assets_dir, load_model, model_dir
from experiments.runner.chunked_loss import chunked_ce, model_loss, supports_chunked_loss, token_nll
from experiments.runner.config_check import CONF_DIR, ConfigError, check_config
from experiments.runner.data import pack_blocks
from experiments.runner.setup import apply_checkpointing, trainable_parameters
from lowra.config import PAPER
from lowra.model_quantization import quantize_model


@pytest.fixture(scope="module")
def model():
    """stories260K at 2 bits (the data-free paper preset, LoftQ adapters: every adapter gets a gradient)."""
    m = load_model()
    quantize_model(m, 2.0, rank=2, alpha=4, progress=False, **{**PAPER, "plan": "uniform", "loftq_iters": 1,
                                                                "codebook_iters": 1})
    return m


@pytest.fixture(scope="module")
def text_ids():
    """The first 20k characters of the TinyStories text, tokenized (≈ 5k tokens; the whole file takes 14 s)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    text = (assets_dir() / "corpora" / "tinystories_valid.txt").read_text()[:20_000]
    return tok(text, return_tensors="pt").input_ids[0]


@pytest.fixture(scope="module")
def batch(text_ids):
    ids = pack_blocks(text_ids[:4096], 64)[:3].clone()
    labels = ids.clone()
    labels[0, :10] = -100  # ignored positions drop out of the mean
    return {"input_ids": ids, "labels": labels}


def _saved_bytes(fn) -> tuple[int, int]:
    """(bytes of the tensors saved for the backward while ``fn()`` runs, the largest last dim among them)."""
    sizes, dims = [], []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        dims.append(t.shape[-1] if t.dim() else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(sizes), max(dims), out


def _grads(model, loss):
    return torch.autograd.grad(loss, list(trainable_parameters(model).values()))


def test_chunked_ce_equals_the_models_loss_and_holds_no_logits(model, batch):
    model.train()
    ref = model(**batch).loss
    ref_grads = _grads(model, ref)
    vocab = model.config.vocab_size
    _, ref_dim, _ = _saved_bytes(lambda: model(**batch).loss)
    assert ref_dim == vocab  # the model's own loss keeps [tokens, vocab] logits for the backward
    for chunk in (7, 64, 10_000):  # uneven chunks, one chunk per sequence, everything in one chunk
        _, dim, loss = _saved_bytes(lambda chunk=chunk: chunked_ce(model, batch, chunk))
        assert dim < vocab, chunk
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)
        for g, r in zip(_grads(model, loss), ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert model_loss(model, batch, None).item() == ref.item()  # null: the model's own loss
    model.eval()


def test_eval_nll_and_perplexity_equal_the_full_logits(model, text_ids):
    heldout = text_ids[-1000:]
    ids = heldout[:3 * 65].view(3, 65)
    torch.testing.assert_close(token_nll(model, ids, 50), token_nll(model, ids, None), rtol=1e-5, atol=1e-5)
    full = perplexity(model, heldout[:1000], window=128, stride=96, batch_size=4, progress=False)
    chunked = perplexity(model, heldout[:1000], window=128, stride=96, batch_size=4, progress=False, chunk_tokens=100)
    assert chunked["ppl"] == pytest.approx(full["ppl"], rel=1e-5)
    assert chunked["tokens"] == full["tokens"]


def test_non_reentrant_checkpointing_same_gradients_less_saved(model, batch):
    """The runner's setting (``use_reentrant=False``): the layers' forward (``lut_linear_autograd``) runs
    again in the backward and gives the same gradients; only the layers' inputs are kept."""
    model.train()
    plain_bytes, _, loss = _saved_bytes(lambda: chunked_ce(model, batch, 64))
    plain = _grads(model, loss)
    apply_checkpointing(model, OmegaConf.create({"gradient_checkpointing": True}))  # the runner's call
    try:
        ckpt_bytes, _, loss2 = _saved_bytes(lambda: chunked_ce(model, batch, 64))
        ckpt = _grads(model, loss2)
    finally:
        model.activation_checkpointing_disable()
        model.eval()
    assert loss2.item() == loss.item()
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert ckpt_bytes < plain_bytes / 3, (ckpt_bytes, plain_bytes)


def test_only_causal_lms_and_positive_chunks():
    from transformers import BartConfig, BartForConditionalGeneration

    bart = BartForConditionalGeneration(BartConfig(vocab_size=32, d_model=8, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=1, decoder_attention_heads=1,
                                                   encoder_ffn_dim=8, decoder_ffn_dim=8))
    assert not supports_chunked_loss(bart)
    ones = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="needs a causal LM"):
        chunked_ce(bart, {"input_ids": ones, "labels": ones}, 2)


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.loss_chunk_tokens=0"], r"model\.loss_chunk_tokens=0 must be a positive integer"),
    (["+model=bart_large", "data=xsum", "model.loss_chunk_tokens=64"],
     r"model\.loss_chunk_tokens=64 needs model\.arch=causal_lm"),
])
def test_config_check_names_bad_chunk_options(overrides, message):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=["logger=none", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)
