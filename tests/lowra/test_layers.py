"""Target selection and adapter helpers (lowra/layers.py), and the import layout of the library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import lowra.model
from lowra import layers
from lowra.layers import find_target_linears, lora_parameters, lowra_layers, mark_only_lora_trainable


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.up_proj = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(16)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.lm_head = nn.Linear(16, 8)


def test_targets_peft_semantics_and_lm_head_skipped():
    model = _Toy()
    every = [n for n, _ in find_target_linears(model, None)]
    assert every == ["layers.0.q_proj", "layers.0.up_proj", "layers.1.q_proj", "layers.1.up_proj"]
    assert [n for n, _ in find_target_linears(model, ["q_proj"])] == ["layers.0.q_proj", "layers.1.q_proj"]
    assert [n for n, _ in find_target_linears(model, r"layers\.1\..*")] == ["layers.1.q_proj", "layers.1.up_proj"]
    assert [n for n, _ in find_target_linears(model, ["lm_head"])] == ["lm_head"]  # named explicitly
    with pytest.raises(ValueError, match="'k_proj' matches no nn.Linear.*q_proj"):
        find_target_linears(model, ["q_proj", "k_proj"])
    with pytest.raises(ValueError, match="regex 'nothing' matches no nn.Linear"):
        find_target_linears(model, "nothing")


def test_adapter_helpers_after_quantization():
    torch.manual_seed(0)
    model = _Toy()
    lowra.model.quantize_model(model, 2, method="nf", rank=2, alpha=4, target_modules=["q_proj"], progress=False)
    names = [n for n, _ in lowra_layers(model)]
    assert names == ["layers.0.q_proj", "layers.1.q_proj"]
    assert len(lora_parameters(model)) == 4
    assert mark_only_lora_trainable(model) == 2 * (2 * 16 + 16 * 2)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"layers.{i}.q_proj.lora_{ab}" for i in (0, 1) for ab in "AB"}
    with pytest.raises(ValueError, match="already contains LowRALinear"):
        find_target_linears(model, None)


def test_model_reexports_the_layer_helpers():
    for name in ("find_target_linears", "lora_parameters", "lowra_layers", "mark_only_lora_trainable",
                 "DEFAULT_TARGET_MODULES", "DEFAULT_SKIP_MODULES"):
        assert getattr(lowra.model, name) is getattr(layers, name)


def _lowra_imports() -> dict[str, set[str]]:
    """``{module: lowra modules it imports}``, function-level (lazy) imports included."""
    root = Path(layers.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowra"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("lowra"))
        graph[name] = deps
    return {m: {d for d in ds if d in graph and d != m and not m.startswith(d + ".")} for m, ds in graph.items()}


def test_no_import_cycle_between_library_modules():
    """calibration ↔ model was a cycle (issue 17): none may come back, lazy imports included.
    (A package importing its own submodules is not a cycle.)"""
    graph = _lowra_imports()
    assert "lowra.model" not in graph["lowra.calibration"]
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(d):] + [d])}")
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
