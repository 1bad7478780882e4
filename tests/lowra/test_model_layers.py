"""Target selection and adapter helpers (lowra/model_layers.py), and the import layout of the library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import lowra.model_quantization
from lowra import model_layers
from lowra.model_layers import find_target_linears, lora_parameters, lowra_layers, mark_only_lora_trainable


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
    lowra.model_quantization.quantize_model(model, 2, method="nf", rank=2, alpha=4, target_modules=["q_proj"],
                                            progress=False)
    names = [n for n, _ in lowra_layers(model)]
    assert names == ["layers.0.q_proj", "layers.1.q_proj"]
    assert len(lora_parameters(model)) == 4
    assert mark_only_lora_trainable(model) == 2 * (2 * 16 + 16 * 2)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"layers.{i}.q_proj.lora_{ab}" for i in (0, 1) for ab in "AB"}
    with pytest.raises(ValueError, match="already contains LowRALinear"):
        find_target_linears(model, None)


def test_public_api_gives_the_layer_helpers_of_their_one_module():
    """``lowra.<helper>`` is the helper of ``lowra.model_layers`` (no second copy re-exported elsewhere)."""
    for name in ("find_target_linears", "lora_parameters", "lowra_layers", "mark_only_lora_trainable"):
        assert getattr(lowra, name) is getattr(model_layers, name)
    assert not hasattr(lowra.model_quantization, "lowra_layers")


def _is_main_guard(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` or ``TYPE_CHECKING`` (imports that never run with the module)."""
    if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
        return True
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and len(test.comparators) == 1 and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__")


def _imports(package: str) -> dict[str, set[str]]:
    """``{module: modules of ``package`` it imports}``, function-level (lazy) imports included."""
    root = Path(model_layers.__file__).parents[1] / package
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps: set[str] = set()
        tree = ast.parse(path.read_text())
        # what runs only as ``python -m module`` is not imported with the module
        main_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_main_guard(block.test)
                     for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in main_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == package)
        graph[name] = deps
    return {m: {d for d in ds if d in graph and d != m and not m.startswith(d + ".")} for m, ds in graph.items()}


def _assert_no_cycle(graph: dict[str, set[str]]) -> None:
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


def test_no_import_cycle_between_library_modules():
    """calibration ↔ model was a cycle (issue 17): none may come back, lazy imports included.
    (A package importing its own submodules is not a cycle.)"""
    graph = _imports("lowra")
    assert "lowra.model_quantization" not in graph["lowra.calibration"]
    assert {"lowra.streaming.passes", "lowra.checkpoint.save"} <= set(graph)  # the stage packages are read
    _assert_no_cycle(graph)


def _reaches_itself(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """An import path from ``start`` back to itself, or None."""
    seen: set[str] = set()
    stack = [(start, [start])]
    while stack:
        m, path = stack.pop()
        for d in sorted(graph[m]):
            if d == start:
                return [*path, d]
            if d not in seen:
                seen.add(d)
                stack.append((d, [*path, d]))
    return None


def test_no_import_cycle_in_experiments():
    """The whole ``experiments`` tree imports one way (lazy imports included): ``experiments.run`` is
    the entry point only, the harness reads the runner's setup from ``experiments.runner.setup``."""
    graph = _imports("experiments")
    assert {"experiments.runner.run", "experiments.eval.harness", "experiments.bench.kernels"} <= set(graph)
    assert "experiments.runner.run" not in graph["experiments.eval.harness"] | graph["experiments.eval.loading"]
    _assert_no_cycle(graph)


def test_three_floors_experiments_lowra_kernels():
    """experiments -> lowra -> lowra_kernels: the library never imports experiments, the kernels never
    import the library."""
    for package, forbidden in (("lowra", ("experiments",)), ("kernels", ("experiments", "lowra"))):
        root = Path(model_layers.__file__).parents[1] / package
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                bad = [n for n in names if n.split(".")[0] in forbidden]
                assert not bad, f"{path.relative_to(root.parent)} imports {bad}"
