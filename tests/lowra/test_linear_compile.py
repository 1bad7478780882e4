"""A LowRA model under ``torch.compile(fullgraph=True)``: no graph break, eager's numbers.

The quantized layers are one ``torch.ops.lowra.lut_linear`` node each. The tests compile with
``backend="aot_eager"`` (Dynamo capture + AOT autograd, i.e. the op's fake and backward are traced,
without inductor's C++ build, which costs minutes on the 2-core CI machine); inductor and SmolLM2 are
measured by ``python -m experiments.bench.compile``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from experiments.bench.decode import quantize_decoder
from experiments.eval.stories import load_model
from lowra.linear import LowRALinear
from lowra.model_layers import lora_parameters


@pytest.fixture(scope="module")
def stories():
    """stories260K, its first 2 of 5 decoder layers (compile time grows with the layers traced; the
    whole model is measured by the benchmark), every decoder linear quantized (1.5 bits: 1- and 2-bit
    rows mixed) with rank-2 adapters."""
    torch.manual_seed(0)
    model = load_model()
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    model = quantize_decoder(model, 1.5, rank=2, backend="auto")
    for m in model.modules():
        if isinstance(m, LowRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.02)  # non-zero B: the adapter path matters
    return model


def _compile(model):
    torch._dynamo.reset()
    return torch.compile(model, fullgraph=True, backend="aot_eager")


def test_compiled_forward_has_no_graph_break_and_matches_eager(stories):
    ids = torch.randint(0, stories.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = stories(ids).logits
        got = _compile(stories)(ids).logits  # fullgraph=True: a graph break raises
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_training_steps_match_eager(stories):
    """loss.backward + AdamW on the adapters, 3 steps, eager and compiled from the same start."""
    ids = torch.randint(0, stories.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    losses = {}
    for mode in ("eager", "compiled"):
        model = copy.deepcopy(stories).train()
        opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
        run = _compile(model) if mode == "compiled" else model
        losses[mode] = []
        for _ in range(3):
            loss = run(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[mode].append(loss.item())
    assert losses["eager"][0] != losses["eager"][-1]  # the adapters trained
    torch.testing.assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["eager"]), rtol=1e-5, atol=0)


def test_static_cache_generate_with_compiled_forward(stories):
    model = copy.deepcopy(stories).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation="static")
    with torch.no_grad():
        want = model.generate(ids, **kw)
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager", dynamic=False)
        got = model.generate(ids, **kw)
    assert torch.equal(got, want)
