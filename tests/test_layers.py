"""The package's layering (docs/architecture.md), read from the source: components know nothing of
the params schema, each layer imports only the layers below it, and no import circle exists.

Every import counts, also those inside functions and under ``TYPE_CHECKING``: a lazy import closes
a circle as surely as a top-level one."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "egat"

# What each component package may import from egat (besides itself): the layers below it.
BELOW = {
    "egat.methods": {"egat.attacks", "egat.explain", "egat.models", "egat.data", "egat.registry",
                     "egat.errors"},
    "egat.attacks": {"egat.models", "egat.registry", "egat.errors", "egat.seeding"},
    "egat.explain": {"egat.models", "egat.registry", "egat.errors"},
    "egat.models": {"egat.registry", "egat.errors", "egat.io"},
}
def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@functools.cache
def imported_modules(name: str) -> frozenset[str]:
    """The egat modules ``name`` imports anywhere in its file (``from a import b`` counts as
    a.b where a.b is a module, else as a)."""
    tree = ast.parse(MODULES[name].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return frozenset(m for m in found if m == "egat" or m.startswith("egat."))


def package_of(module: str, packages) -> str | None:
    return next((p for p in packages if module == p or module.startswith(p + ".")), None)


def components() -> list[str]:
    return [m for m in MODULES if package_of(m, BELOW)]


@pytest.mark.parametrize("module", components())
def test_components_never_import_the_params_schema(module):
    assert "egat.config" not in imported_modules(module)


@pytest.mark.parametrize("module", components())
def test_components_import_only_the_layers_below_them(module):
    own = package_of(module, BELOW)
    foreign = {m for m in imported_modules(module) if package_of(m, [own]) is None}
    upward = {m for m in foreign if package_of(m, BELOW[own]) is None}
    assert not upward, f"{module} imports {sorted(upward)}, not below {own}"


def test_the_params_schema_imports_no_component_and_no_registry():
    reached = imported_modules("egat.config")
    assert not {m for m in reached if package_of(m, [*BELOW, "egat.registry", "egat.build"])}


def circles() -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    graph = {m: imported_modules(m) & MODULES.keys() for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_the_package_has_no_import_circle():
    assert circles() == []
