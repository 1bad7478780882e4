"""The README is a front door that works: its links resolve, the `make` targets the docs name exist,
it stays short, and its Python example runs as printed (on the real stories260K)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "conf" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def _relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in _relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page.name}: broken links: {broken}"


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):(?!=)", text, re.M))


def test_every_make_target_the_docs_name_exists() -> None:
    targets = _make_targets()
    named = set()
    for page in PAGES:
        text = page.read_text()
        fenced = "\n".join(FENCE.findall(text))
        named |= {(page.name, t) for t in re.findall(r"`make ([a-z][\w-]*)", text)}
        named |= {(page.name, t) for t in re.findall(r"^make ([a-z][\w-]*)", fenced, re.M)}
    missing = sorted(f"{page}: make {t}" for page, t in named if t not in targets)
    assert named and not missing, f"docs name make targets that do not exist: {missing}"


def test_every_python_module_the_docs_run_exists() -> None:
    """Each `python -m <module>` in the README, docs, conf and Makefile names a module of this checkout (or
    of the environment: pytest, pip, …), so a renamed or moved entry point cannot leave a dead command."""
    import importlib.util

    sources = [*PAGES, REPO / "Makefile"]
    named = {(src.name, m) for src in sources
             for m in re.findall(r"python3? -m ([A-Za-z_](?:[\w.]*\w)?)", src.read_text())}
    missing = []
    for src, module in sorted(named):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(f"{src}: python -m {module}")
    assert len(named) > 20 and not missing, f"docs run modules that do not exist: {missing}"


def test_readme_is_a_front_door() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in ("design", "running", "results", "streaming", "kernels", "cpu", "reproduce"):
        assert f"(docs/{page}.md)" in readme, f"README does not link docs/{page}.md"


def test_code_cites_only_documents_the_project_has() -> None:
    """Comments cite docs/design.md; a `DESIGN.md` outside the repository is not the project's."""
    cited = []
    for folder in ("lowra", "kernels", "experiments", "tests", "conf"):
        for path in (REPO / folder).rglob("*"):
            if path == Path(__file__).resolve() or path.suffix not in {".py", ".yaml", ".md"}:
                continue
            if "DESIGN.md" in path.read_text():
                cited.append(str(path.relative_to(REPO)))
    assert not cited, f"cite docs/design.md instead of DESIGN.md: {cited}"


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    assets = Path(os.environ.get("LOWRA_ASSETS", REPO.parent / "shared" / "assets"))
    if not (assets / "models" / "stories260K").is_dir():
        pytest.skip(f"stories260K not found under {assets}")
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)
    example = next(b for b in blocks if "save_quantized" in b)
    example = example.replace('"../shared/assets"', repr(str(assets)))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)  # the README's own code: the point of the test
    model, again, batch = scope["model"], scope["again"], scope["batch"]
    assert (tmp_path / "ck" / "config.json").is_file()
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, model(**batch).logits)
