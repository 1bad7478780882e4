"""No function in ``lowra/`` or the runner longer than ~80 lines (issue 28), as a ratchet.

Lines are counted from ``def`` to the function's end without its docstring. ``KNOWN`` lists the
functions that were longer when the check was added (by name, so a module rename does not matter),
with their length then: one of them may not grow, a new one may not cross the limit, and a fixed
one must leave the list (so it shrinks). The list is the work left.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("lowra", "experiments/runner")
LIMIT = 80
KNOWN: dict[str, int] = {}  # function name (its module may move): code lines when listed (2026-12-07); all fixed


def code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    lines = fn.end_lineno - fn.lineno + 1
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        lines -= body[0].end_lineno - body[0].lineno + 1
    return lines


def long_functions() -> dict[str, tuple[int, str]]:
    """``{function name: (code lines, path)}`` of every function over ``LIMIT`` lines."""
    found = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and code_lines(node) > LIMIT:
                    found[node.name] = (code_lines(node), path.relative_to(REPO).as_posix())
    return found


def test_no_new_long_function_and_known_ones_do_not_grow():
    found = long_functions()
    new = {k: v for k, v in found.items() if k not in KNOWN}
    assert not new, f"functions over {LIMIT} code lines (split them): {new}"
    grown = {k: (KNOWN[k], v) for k, v in found.items() if v[0] > KNOWN[k]}
    assert not grown, f"listed long functions grew (was, now): {grown}"
    fixed = sorted(set(KNOWN) - set(found))
    assert not fixed, f"now within {LIMIT} lines (or renamed): remove them from KNOWN: {fixed}"


def test_code_lines_skips_the_docstring():
    fn = ast.parse('def f():\n    """doc\n    more"""\n    return 1\n').body[0]
    assert code_lines(fn) == 2
