"""No import cycle anywhere in embstore, heads and cli: an AST walk of every module's imports of these packages,
the lazy ones inside functions included. Imports under ``if TYPE_CHECKING:`` never run, so they cannot break an
import; they are walked too, in a second graph, because a loop they hide is still a loop in the design (the
estimator and its fitting helpers once knew each other that way)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("embstore", "heads", "cli")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, modules: dict[str, Path], me: str, type_checking: bool = False) -> set[str]:
    """The project modules ``tree`` imports: ``import a.b``, ``from a import b`` (the submodule a.b when there is
    one, else the package a), anywhere in the file; under ``if TYPE_CHECKING:`` only with ``type_checking``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node) and not type_checking:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules and m != me}


def import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    """Every project module's project imports; with ``type_checking`` also those under ``if TYPE_CHECKING:``."""
    modules = _modules()
    return {name: _imports(ast.parse(path.read_text()), modules, name, type_checking) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
            strong(v)
    return out


def test_the_walk_sees_lazy_imports():
    graph = import_graph()
    assert "heads.probe.sweep" in graph and "embstore.store.reader" in graph["heads.probe.sweep"]
    # imported inside a function body only
    assert (
        "heads.finetune.run" in graph["cli.heads_cli"] and "embstore.backbones.registry" in graph["heads.finetune.run"]
    )


def test_type_checking_imports_are_walked_in_the_second_graph():
    source = "from typing import TYPE_CHECKING\nimport b\nif TYPE_CHECKING:\n    from c import thing\n"
    modules = {m: Path(f"{m}.py") for m in ("a", "b", "c")}
    assert _imports(ast.parse(source), modules, "a") == {"b"}
    assert _imports(ast.parse(source), modules, "a", type_checking=True) == {"b", "c"}
    assert "embstore.store.reader" in import_graph(type_checking=True)["heads.protocol.roles"]  # only there


def test_a_cycle_is_found_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def private_imports(tree: ast.AST, modules: dict[str, Path]) -> list[str]:
    """``module.name`` for every private name (``_x``, not ``__x__``) ``tree`` imports from a project module."""
    return sorted(
        f"{node.module}.{a.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module in modules and node.level == 0
        for a in node.names
        if a.name.startswith("_") and not a.name.startswith("__")
    )


def test_a_private_import_is_found():
    modules = {"a": Path("a.py"), "b": Path("b.py")}
    source = "from a import _helper, public\nfrom a import __version__\ndef f():\n    from b import _inner\n"
    assert private_imports(ast.parse(source), modules) == ["a._helper", "b._inner"]


def test_no_module_imports_another_modules_private_names():
    """A name another module needs is public (no underscore); a product never borrows another's internals."""
    modules = _modules()
    found = {name: private_imports(ast.parse(path.read_text()), modules) for name, path in modules.items()}
    assert {name: names for name, names in found.items() if names} == {}


def _in(package: str, component: list[str]) -> bool:
    return any(m == package or m.startswith(package + ".") for m in component)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    found = [c for c in cycles(import_graph()) if _in(package, c)]
    assert found == [], found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_cycle_hidden_under_type_checking(package):
    found = [c for c in cycles(import_graph(type_checking=True)) if _in(package, c)]
    assert found == [], found


def test_embstore_keeps_only_its_five_top_level_modules():
    """The store, data, backbones and extraction live in their subpackages; only these stay at the top."""
    top = sorted(p.stem for p in (ROOT / "embstore").glob("*.py"))
    assert top == ["__init__", "config", "device", "errors", "layers"], top
    packages = sorted(p.parent.name for p in (ROOT / "embstore").glob("*/__init__.py"))
    assert packages == ["backbones", "data", "extraction", "store"], packages
