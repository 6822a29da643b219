"""The package as a whole: imports point one way, no module swaps its class, and the docs cite
only files the repository holds."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "losatok_jax"


def _imports(path: Path) -> set[str]:
    """The losatok_jax modules a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("losatok_jax"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("losatok_jax"))
    return found


def test_no_import_cycle_in_the_package():
    modules = {f"losatok_jax.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {name: {m for m in _imports(path) if m in modules and m != name}
             for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join(trail + [name])
        state[name] = "open"
        for child in sorted(graph[name]):
            visit(child, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])


def test_no_module_imports_one_below_it_in_the_architecture_table():
    """docs/architecture.md lists every module of the package in an order that its imports
    (at the top or inside functions) never go down."""
    text = (REPO / "docs" / "architecture.md").read_text()
    layout = text[text.index("## Code layout"):]
    rows = re.findall(r"^\| (`[a-z_]+\.py`(?:, `[a-z_]+\.py`)*) \|", layout, re.M)
    row_of = {f"losatok_jax.{name}": i for i, row in enumerate(rows)
              for name in re.findall(r"`([a-z_]+)\.py`", row)}
    modules = {f"losatok_jax.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert sorted(row_of) == sorted(modules)
    for name, path in modules.items():
        for imported in _imports(path) & set(modules):
            assert row_of[imported] <= row_of[name], f"{name} imports {imported}, below it"


def test_no_module_swaps_its_class():
    for path in PACKAGE.rglob("*.py"):
        assert "__class__ =" not in path.read_text(), path


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


def test_docs_cite_only_files_the_repository_holds():
    """Markdown links and backticked file names with a repository folder or a .md suffix, in the
    docs, READMEs (the golden data's too), docstrings and comments: each exists, relative to the
    citing file, to the repository or (result tables, cited by name) to benchmarks/results."""
    texts = [REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("*/README.md"),
             *REPO.glob("tests/data/*/README.md"), *PACKAGE.rglob("*.py"),
             *REPO.glob("benchmarks/*.py"), *REPO.glob("tests/*.py")]
    folders = "docs|benchmarks|tests|losatok_jax|convert|config|ckpts|examples"
    cited = re.compile(r"(?:\]\(|`|\s)((?:\.\./)*(?:(?:" + folders + r")/[\w./-]+?\.(?:md|py|json|yml"
                       r"|wav|sh|c)|[\w-]+\.md))(?=[)#`\s.,;]|$)")
    missing = []
    for text_file in texts:
        for path in cited.findall(text_file.read_text()):
            bases = (text_file.parent, REPO, REPO / "benchmarks" / "results")
            if not any((base / path).exists() for base in bases):
                missing.append(f"{text_file.relative_to(REPO)}: {path}")
    assert not missing


def test_the_runtime_package_never_imports_torch():
    """Not even lazily: torch's file format is read and written by `_torch_format`."""
    importing = [str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")
                 if re.search(r"^\s*(import torch|from torch)\b", p.read_text(), re.M)]
    assert not importing
