"""Fences kept by tests, not by discipline: read from the source's own import
statements (nothing is imported, so a fence holds whatever a module does at
import time).

- No module of ``services/`` or ``proto/`` imports nats-py: the bus module in
  ``baton/`` is the only door to NATS.
- The decision modules (transitions, workflows, the run state, limits,
  fairness, in-flight) import nothing from the bus, ``asyncio``, ``time`` or
  ``random`` — transitively, through every module of this repository they
  import — so a decision is a function of its arguments and replays the same.
- The runtime (``services/``, ``proto/``, ``baton/`` but ``baton/dev/``) never
  imports the dev tooling in ``baton/dev/`` when a module loads; only a
  function on a dev path may (building the tiny model).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("baton", "services", "proto")  # the repository's own top-level packages

DECISIONS = (
    "services.orchestrator.transitions",
    "services.orchestrator.workflows",
    "services.orchestrator.state",
    "services.orchestrator.limits",
    "services.orchestrator.fairness",
    "services.orchestrator.inflight",
    # pure by their own docstrings, and kept so
    "services.orchestrator.waterfall",
    "services.orchestrator.listing",
    "services.orchestrator.console.views",
)
# Not imported by a decision, however indirectly: the door to NATS, the
# event loop, the clock, chance.
FORBIDDEN = ("nats", "baton.bus", "asyncio", "time", "random")


def _path(module: str) -> Path | None:
    """The file of a module of this repository (None: not one of ours)."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_package(module: str) -> bool:
    return (ROOT.joinpath(*module.split(".")) / "__init__.py").is_file()


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith(
        "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import that runs (at import time or in a call); those under
    ``if TYPE_CHECKING:`` never do."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif _type_checking_only(node):
            assert isinstance(node, ast.If)
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def imports_of(module: str) -> set[str]:
    """The absolute names a module imports (``from a import b`` yields ``a``
    and, when it is a module of ours, ``a.b``)."""
    path = _path(module)
    assert path is not None, module
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1])
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        names.add(base)
        for alias in node.names:
            if _path(f"{base}.{alias.name}") is not None:
                names.add(f"{base}.{alias.name}")
    return names


def _with_parents(module: str) -> list[str]:
    """A module and the packages whose ``__init__`` importing it runs."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def reach(start: str) -> dict[str, str]:
    """Every module ``start`` imports, transitively through this repository's
    modules: name -> the module of ours that imports it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        module = todo.pop()
        for name in imports_of(module):
            for each in _with_parents(name):
                if each in seen or each == start:
                    continue
                seen[each] = module
                if each.split(".")[0] in PACKAGES and _path(each) is not None:
                    todo.append(each)
    return seen


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def _chain(seen: dict[str, str], name: str, start: str) -> str:
    links = [name]
    while links[-1] != start and links[-1] in seen:
        links.append(seen[links[-1]])
    return " <- ".join(links)


def _sources(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py"))


@pytest.mark.parametrize("module", DECISIONS)
def test_decision_module_imports_no_bus_loop_clock_or_chance(module: str) -> None:
    assert _path(module) is not None, f"{module}: no such module (moved? update DECISIONS)"
    seen = reach(module)
    bad = sorted(_chain(seen, name, module) for name in seen if _forbidden(name))
    assert bad == [], f"{module} reaches: {bad}"


def test_services_and_proto_never_import_nats() -> None:
    offenders = []
    for path in _sources("services", "proto"):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        for name in imports_of(module):
            if name == "nats" or name.startswith("nats."):
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []


def _loaded_with_module(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports that run when the module loads (not those in a function)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            stack.extend(ast.iter_child_nodes(node))


def test_the_runtime_loads_no_dev_tooling() -> None:
    offenders = []
    for path in _sources("services", "proto", "baton"):
        if (ROOT / "baton" / "dev") in path.parents:
            continue
        for node in _loaded_with_module(ast.parse(path.read_text(), str(path))):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            )
            if any(n == "baton.dev" or n.startswith("baton.dev.") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_the_fence_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The fence can fail: a module that imports ``time`` through a relative
    import of ours is caught, and one importing it only for type checking is
    not."""
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import time\n"
        "if TYPE_CHECKING:\n    import random\n"
        "def f():\n    import asyncio\n"
    )
    names = {
        alias.name
        for node in _import_nodes(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert names == {"time", "asyncio"}
    seen = reach("services.orchestrator.conductor")  # the shell: it may, and does
    assert any(_forbidden(name) for name in seen)
