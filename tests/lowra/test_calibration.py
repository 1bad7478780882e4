"""The calibration pass's memory-lean mechanics: checkpointed layers, sliced LM head, shared Grams.

``collect_fisher`` must give exactly what a plain forward/backward through ``model(labels=ids)``
gives; these tests compute that reference directly with hooks and compare.
"""

from __future__ import annotations

import pytest
import torch

from experiments.eval.stories import load_model, token_splits
from lowra.calibration import _decoder_layers, calibration_windows, collect_fisher


@pytest.fixture(scope="module")
def windows():
    train, _ = token_splits()
    return calibration_windows(train, 8, 64, seed=1)


def _plain_statistics(model, chunks, names):
    """Reference: whole-model forward/backward per chunk; returns (fisher, G, H) as collect_fisher defines them."""
    mods = {n: model.get_submodule(n) for n in names}
    fisher = {n: torch.zeros_like(m.weight) for n, m in mods.items()}
    g2 = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in mods.items()}
    gram = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in mods.items()}
    tokens = 0

    def fwd(name):
        def fn(_m, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            gram[name] += (x.T @ x).double()
            out.register_hook(bwd(name))
        return fn

    def bwd(name):
        def fn(g):
            g2[name] += g.detach().reshape(-1, g.shape[-1]).double().pow(2).sum(0)
        return fn

    handles = [m.register_forward_hook(fwd(n)) for n, m in mods.items()]
    try:
        for ids in chunks:
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            for n, m in mods.items():
                fisher[n] += m.weight.grad.float() ** 2
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return ({n: f / len(chunks) for n, f in fisher.items()}, {n: g / tokens for n, g in g2.items()},
            {n: h / tokens for n, h in gram.items()})


def test_lean_pass_matches_a_plain_backward(windows):
    model = load_model()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.up_proj", "model.layers.4.mlp.down_proj"]
    chunks = list(windows.split(4))
    ref_f, ref_g, ref_h = _plain_statistics(model, chunks, names)
    fisher, hess, g = collect_fisher(model, chunks, names, hessians=True, output_grads=True, head_tokens=48)
    for n in names:
        torch.testing.assert_close(fisher[n], ref_f[n], rtol=1e-5, atol=0)
        torch.testing.assert_close(g[n], ref_g[n], rtol=1e-5, atol=0)
        torch.testing.assert_close(hess[n], ref_h[n], rtol=1e-6, atol=1e-9)
    # activation-only backward (no weight gradient at all) gives the same output factors
    _, hess2, g2 = collect_fisher(model, chunks, names, hessians=True, output_grads=True, diagonal=False)
    for n in names:
        torch.testing.assert_close(g2[n], g[n], rtol=1e-6, atol=0)
        assert torch.equal(hess2[n], hess[n])
    # the model comes back as it was: no layer keeps a patched forward, no gradient, same flags
    assert all("forward" not in vars(layer) for layer in _decoder_layers(model))
    assert len(_decoder_layers(model)) == model.config.num_hidden_layers
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_layers_reading_one_input_share_one_gram(windows):
    model = load_model()
    _, hess, _ = collect_fisher(model, windows.split(4), None, hessians=True, output_grads=True, diagonal=False)
    for i in range(model.config.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        assert hess[f"{attn}.q_proj"] is hess[f"{attn}.k_proj"] is hess[f"{attn}.v_proj"]
        assert hess[f"{mlp}.gate_proj"] is hess[f"{mlp}.up_proj"]
    assert len({id(h) for h in hess.values()}) == 4 * model.config.num_hidden_layers  # qkv, o, gate/up, down


def test_models_without_known_blocks_run_whole_with_the_same_result(windows):
    names = ["model.layers.1.self_attn.o_proj"]
    model = load_model()
    lean = collect_fisher(model, windows.split(4), names, hessians=True, output_grads=True)
    model._no_split_modules = None  # no decoder layers to checkpoint
    model.get_decoder = lambda: None  # no plain head: the whole model computes the loss
    whole = collect_fisher(model, windows.split(4), names, hessians=True, output_grads=True)
    for a, b in zip(lean, whole):
        for n in names:
            torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=0)
