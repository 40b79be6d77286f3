"""The package's import layers, enforced: each layer imports only from the layers below it.

    errors, _version  ←  core  ←  io  ←  merge, fold, extract, convert, demo  ←  runtime  ←  tune
        ←  recipe, hub  ←  cli  ←  the package root (the facade)

Every import counts, including those inside functions, because a function-level import is how
an import knot hides. No module imports the package root, and no set of modules imports each
other in a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "loramerge"

# Lower number = lower layer. A module may import from its own layer or any lower one.
LAYERS: dict[str, int] = {
    "loramerge._version": 0,
    "loramerge.errors": 0,
    "loramerge.core": 1,
    "loramerge.io": 2,
    "loramerge.merge": 3,
    "loramerge.fold": 3,
    "loramerge.extract": 3,
    "loramerge.convert": 3,
    "loramerge.demo": 3,
    "loramerge.runtime": 4,
    "loramerge.tune": 5,
    "loramerge.recipe": 6,
    "loramerge.hub": 6,
    "loramerge.cli": 7,
    "loramerge.__main__": 8,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def is_module(dotted: str) -> bool:
    where = PACKAGE.parent / dotted.replace(".", "/")
    return where.with_suffix(".py").exists() or (where / "__init__.py").exists()


def imports_of(path: Path) -> set[str]:
    """Every ``loramerge`` module that ``path`` imports, at any depth of its code."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "loramerge")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "loramerge":
                continue
            # ``from loramerge.io.formats import peft`` depends on the submodule, not on the package's
            # own code; a name that is not a submodule is taken from the module itself.
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if is_module(candidate) else node.module)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules} for name, path in modules.items()}


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively: the cycles of the import graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(component)
    return components


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in graph() if m != "loramerge" and layer_of(m) is None)
    assert not unplaced, f"modules outside every layer (add them to LAYERS): {unplaced}"


def test_no_module_imports_the_package_root() -> None:
    offenders = sorted(m for m, targets in graph().items() if "loramerge" in targets and m != "loramerge")
    assert not offenders, f"these modules import the package root; import the defining module instead: {offenders}"


@pytest.mark.parametrize("module", sorted(m for m in graph() if m != "loramerge"))
def test_imports_go_down_the_layers(module: str) -> None:
    own = layer_of(module)
    upward = sorted(t for t in graph()[module] if t != "loramerge" and (layer_of(t) or 0) > (own or 0))
    assert not upward, f"{module} (layer {own}) imports from higher layers: {upward}"


def test_there_is_no_import_cycle() -> None:
    cycles = [sorted(c) for c in strongly_connected(graph()) if len(c) > 1]
    assert not cycles, f"modules that import each other in a cycle: {cycles}"
