"""The test suite's own rule: no test module imports another test module (or conftest.py). Shared builders live in
factories.py, shared fixtures in conftest.py; an import from a test module would run that module's fixtures and
constants twice and tie two modules' tests together."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _is_test_module(name: str) -> bool:
    return any(p.startswith("test_") or p == "conftest" for p in name.split(".") if p)


def imports_of_test_modules(source: str) -> list[str]:
    """The test modules (``test_*``, ``conftest``, also as ``tests.<name>``) that ``source`` imports, anywhere in
    it (imports inside functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if _is_test_module(a.name))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if _is_test_module(module):
                found.add(module)
            else:  # from tests import test_x, from . import test_x
                found.update(f"{module}.{a.name}".lstrip(".") for a in node.names if _is_test_module(a.name))
    return sorted(found)


@pytest.mark.parametrize(
    "source, found",
    [
        ("from test_heads_sweep import separable", ["test_heads_sweep"]),
        ("def f():\n    from tests.test_resume import x", ["tests.test_resume"]),
        ("import test_audio as a", ["test_audio"]),
        ("from tests import test_cli", ["tests.test_cli"]),
        ("from conftest import TEXTS", ["conftest"]),
        ("from . import test_x", ["test_x"]),
        ("from factories import separable\nfrom heads.protocol import split_roles\nimport pytest", []),
    ],
)
def test_the_walk_finds_imports_of_test_modules(source, found):
    assert imports_of_test_modules(source) == found


@pytest.mark.parametrize("path", sorted(TESTS.glob("*.py")), ids=lambda p: p.name)
def test_no_test_module_imports_another(path: Path):
    found = imports_of_test_modules(path.read_text())
    assert found == [], f"{path.name} imports {found}: move what it needs into tests/factories.py and import it there"
