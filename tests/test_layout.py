"""The package layout stays readable: no module longer than one reads in a sitting, and no
import circle (two modules that import each other, directly or around a loop).

Imports are read from the source with `ast`, not by importing: every `import` and
`from ... import` counts, relative ones and those inside functions too (a lazy import is still
a dependency), except those under `if TYPE_CHECKING:`, which never run.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Every package of the project: imports between them form the graph the cycles are looked
# for in, so a circle through another package is found too.
PROJECT = ("latency", "nas", "search_spaces")
# The packages held to both rules.
CHECKED = ("latency", "nas")
MAX_LINES = 450


def modules(root: Path, packages=PROJECT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `packages` under `root`."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` but those inside `if TYPE_CHECKING:` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = child.test if isinstance(child, ast.If) else None
            name = getattr(test, "id", None) or getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules that module `name` (at `path`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def project_module(dotted: str) -> str | None:  # the longest prefix that is a module
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in known:
                return ".".join(parts[:end])
        return None

    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [project_module(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule where there is one, else pkg itself
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else project_module(base)
                for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t is not None and t != name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_graph(root: Path, packages=PROJECT) -> dict[str, set[str]]:
    known = modules(root, packages)
    return {name: imports(name, path, known) for name, path in known.items()}


def checked(module: str) -> bool:
    return module.split(".")[0] in CHECKED


def test_no_module_is_longer_than_one_sitting():
    long = {
        str(path.relative_to(ROOT)): n
        for name, path in modules(ROOT).items()
        if checked(name) and (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these along their seams (over {MAX_LINES} lines): {long}"


def test_no_two_modules_import_each_other():
    found = [c for c in cycles(import_graph(ROOT)) if any(checked(m) for m in c)]
    assert not found, f"import circles: {found}"


def test_a_cycle_through_relative_and_function_level_imports_is_found(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .sub import b\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "def f():\n    from ..c import g\n",
        "pkg/c.py": "import os\nfrom typing import TYPE_CHECKING\nfrom . import a\n",
        "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import x\n",
        "pkg/e.py": "from pkg.d import y\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.d"] == set()  # a TYPE_CHECKING import never runs
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (tmp_path / "pkg/d.py").write_text("def f():\n    import pkg.e\n")
    assert ["pkg.d", "pkg.e"] in cycles(import_graph(tmp_path, ("pkg",)))


@pytest.mark.parametrize("package", CHECKED)
def test_the_checked_packages_exist(package):
    assert any(m.split(".")[0] == package for m in modules(ROOT)), package
