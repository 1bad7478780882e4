"""The import graph of the whole tree: three floors (experiments -> lowra -> lowra_kernels), no cycle
inside any of them, lazy (function-level) imports included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root


def _is_main_guard(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` or ``TYPE_CHECKING`` (imports that never run with the module)."""
    if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
        return True
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and len(test.comparators) == 1 and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__")


def _imports(package: str) -> dict[str, set[str]]:
    """``{module: modules of ``package`` it imports}``, function-level (lazy) imports included."""
    root = ROOT / package
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
        root = ROOT / package
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                bad = [n for n in names if n.split(".")[0] in forbidden]
                assert not bad, f"{path.relative_to(root.parent)} imports {bad}"
