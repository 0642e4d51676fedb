"""One-way imports: a module of ``anytrain`` imports only its own layer or lower ones (DESIGN.md).

Layers, lowest first: ``registry``, ``config`` → ``data``, ``nets``, ``optim`` → ``rules``, ``sparsity`` →
``eval``, ``greedy``, ``inference`` → ``train`` → ``cli``. Every import counts, also one inside a function; only
imports under ``if TYPE_CHECKING:`` (never run) are exempt. The imports are read from the source with ``ast``,
so nothing is executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import anytrain

LAYERS = [
    ("registry", "config"),
    ("data", "nets", "optim"),
    ("rules", "sparsity"),
    ("eval", "greedy", "inference"),
    ("train",),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names} | {"cli": len(LAYERS)}
ROOT = Path(anytrain.__file__).parent

# (importing module, imported module) pairs that break the order today; each one is a known violation, issue 12.
# The list only shrinks: the test fails on a new violation and on an entry that no longer occurs.
KNOWN: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> set[str]:
    """Every ``anytrain.*`` module the file at ``path`` imports, outside ``if TYPE_CHECKING:`` blocks."""
    return _imports_of(path.read_text(), _module_name(path), path.name == "__init__.py")


def _imports_of(source: str, module: str, is_package: bool) -> set[str]:
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
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
            found.add(target)
            # `from anytrain import nets` / `from . import _base` import the submodule itself
            found.update(f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source, module))
    return {m for m in found if m == "anytrain" or m.startswith("anytrain.")}


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER[parts[1]] if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


def _violations() -> set[tuple[str, str]]:
    bad = set()
    for importer, imported in _graph().items():
        own = _layer(importer)
        if own is None:  # the top-level package: its entry points load every layer lazily, on first use
            continue
        for name in imported:
            # importing the top-level package itself (``__version__``) loads nothing else: it sits below all
            layer = _layer(name)
            if layer is not None and layer > own:
                bad.add((importer, name))
    return bad


def test_every_package_has_a_layer() -> None:
    packages = {p.stem if p.suffix == ".py" else p.name for p in ROOT.iterdir() if not p.name.startswith("_")}
    packages = {p for p in packages if _is_module(f"anytrain.{p}")}
    assert packages == set(LAYER), "give every anytrain package a layer in LAYERS"


def test_imports_run_one_way() -> None:
    found = _violations()
    new = sorted(found - KNOWN)
    assert not new, f"imports that reach up a layer (see DESIGN.md): {new}"
    gone = sorted(KNOWN - found)
    assert not gone, f"fixed, remove from KNOWN: {gone}"


def test_no_import_cycles_between_modules() -> None:
    # Within a layer too, modules import one way (a submodule importing its own package's re-exports is not
    # an edge: the package imports it, not the other way round).
    graph = {
        m: {i for i in imported if i != m and _is_module(i) and not m.startswith(i + ".")}
        for m, imported in _graph().items()
    }
    done: set[str] = set()

    def walk(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(m) :] + [m])}")
        if m in done:
            return
        for n in sorted(graph.get(m, ())):
            walk(n, path + [m])
        done.add(m)

    for m in sorted(graph):
        walk(m, [])


def test_the_check_sees_lazy_and_relative_imports() -> None:
    # the parser itself: a lazy import inside a function counts, a TYPE_CHECKING one does not
    src = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from anytrain.train import Trainer\n"
        "def f():\n    from ..rules import _base\n    import anytrain.cli\n"
    )
    found = _imports_of(src, "anytrain.nets.probe", is_package=False)
    assert found == {"anytrain.rules", "anytrain.rules._base", "anytrain.cli"}
