"""The package's layout keeps its promises: no import cycles, layers that only
look down, and no plugin mode names in the core outside the install-hint table.

Run ``python -m pytest tests/test_architecture.py -q`` to check; on failure the
message names the cycle or the offending import.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

import mixprec
from mixprec._registry import FIRST_PARTY_MODES

ROOT = Path(mixprec.__file__).parent

#: the wrapped objects point back at their owner (a copy builds its own wrapper)
ALLOWED_BACK_EDGES = {("mixprec._module", "mixprec._wrapper")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """mixprec modules ``path`` imports when run (module level or inside functions),
    leaving out ``if TYPE_CHECKING:`` blocks."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # a submodule, else a name from the module itself
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    """Every module of the mixprec package and the mixprec modules it imports."""
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(paths)
    return {name: _runtime_imports(path, modules) for name, path in sorted(paths.items())}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if (node, nxt) in ALLOWED_BACK_EDGES:
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 20  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"mixprec._module": {"mixprec._wrapper"},
                       "mixprec._wrapper": {"mixprec._module"}}) is None


def test_the_leaf_modules_import_only_exceptions():
    graph = import_graph()
    for leaf in ("mixprec._tensors", "mixprec._dtypes", "mixprec._match", "mixprec._modestring",
                 "mixprec._checkpoint"):
        assert graph[leaf] <= {"mixprec.exceptions"}, (leaf, graph[leaf])


def _code_strings(tree: ast.AST) -> list[str]:
    """String constants of the code, leaving out docstrings."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                       ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_core_file_names_a_plugin_mode(path):
    """Plugin modes are named only in the registry's install-hint table: the core
    decides by ModeSpec.tags, never by a plugin's mode name or a pattern of names
    (examples in messages and docs are fine)."""
    tree = ast.parse(path.read_text())
    if path.name == "_registry.py":  # the table itself
        for node in ast.walk(tree):
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == \
                    "FIRST_PARTY_MODES":
                node.value = ast.Constant(None)
    found = sorted({s for s in _code_strings(tree)
                    if s in FIRST_PARTY_MODES or ("*" in s and len(s) < 40 and any(
                        fnmatch.fnmatchcase(name, s) for name in FIRST_PARTY_MODES))})
    assert not found, f"{path.relative_to(ROOT.parent)} names plugin modes {found}"
