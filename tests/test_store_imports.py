"""Layers: the store, the model and the renderer load only what they need, and no two modules
of the package import each other, directly or around a circle (counting every import
statement, also those in functions and under ``if TYPE_CHECKING:``)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "newsletter"
LIBRARIES = ["requests", "yaml", "pydantic", "jinja2", "premailer", "feedparser", "click", "flask"]

# (module, what importing it must not load). "newsletter.*" stands for every module of the
# package but the one imported (and the package itself).
FORBIDDEN = [
    ("newsletter.model", ["newsletter.*", *LIBRARIES, "sqlite3"]),
    ("newsletter.storage", ["newsletter.store", "newsletter.config", *LIBRARIES, "sqlite3"]),
    (
        "newsletter.store",
        [
            *LIBRARIES,
            "psycopg",  # only a postgresql:// URL loads it
            "newsletter.config",
            "newsletter.feeds",
            "newsletter.subscribers",
            "newsletter.senders",
        ],
    ),
    ("newsletter.render", ["requests", "feedparser", "sqlite3", "newsletter.store"]),
    ("newsletter.subscribers", ["newsletter.store", "sqlite3", *LIBRARIES]),
]


def loaded_by(module: str) -> set[str]:
    """What a clean interpreter has in sys.modules after importing ``module``."""
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout))


@pytest.mark.parametrize(("module", "forbidden"), FORBIDDEN, ids=[m for m, _ in FORBIDDEN])
def test_importing_loads_only_what_it_needs(module: str, forbidden: list[str]) -> None:
    loaded = loaded_by(module)
    found = set()
    for name in forbidden:
        if name == "newsletter.*":
            found |= {m for m in loaded if m.startswith("newsletter.")} - {module}
        else:
            found |= {m for m in loaded if m == name or m.startswith(name + ".")}
    assert not found, f"import {module} loads {sorted(found)}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, package: str, modules: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    if node.level:
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    found = {base} if base in modules else set()
    # ``from . import digest``: a module, not a name in the package's __init__.
    return found | {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}


def imports(path: Path, modules: set[str], anywhere: bool) -> set[str]:
    """The package's modules ``path`` imports. ``anywhere``: every import statement in the
    file (in functions, under ``if TYPE_CHECKING:``); otherwise only those that run when it
    is loaded (module level, inside try/if too, but not under ``if TYPE_CHECKING:``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.update(_targets(node, package, modules))
            elif isinstance(node, ast.If):
                if not _is_type_checking(node):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    if anywhere:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.update(_targets(node, package, modules))
    else:
        visit(tree.body)
    found.discard(name)
    return found


def import_graph(anywhere: bool = False) -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: imports(path, modules, anywhere) for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle of imports, each once, found by a depth-first walk."""
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    done: set[str] = set()

    def walk(node: str, trail: list[str]) -> None:
        if node in trail:
            circle = trail[trail.index(node) :]
            if frozenset(circle) not in seen:
                seen.add(frozenset(circle))
                found.append([*circle, node])
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            walk(nxt, [*trail, node])
        done.add(node)

    for start in sorted(graph):
        walk(start, [])
    return found


def test_the_walk_sees_the_imports() -> None:
    graph = import_graph()
    # A few edges known to be there: if these vanish, the walk is broken, not the code clean.
    assert "newsletter.model" in graph["newsletter.store.sqlite"]
    assert "newsletter.build" in graph["newsletter.preview"]
    assert "newsletter.store.sqlite" in graph["newsletter.store"]
    assert graph["newsletter.model"] == set()
    assert "newsletter.social" not in graph["newsletter.digest"]  # imported in functions only
    assert "newsletter.social" in import_graph(anywhere=True)["newsletter.digest"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}) == [["a", "b", "c", "a"], ["d", "d"]]


@pytest.mark.parametrize("anywhere", [False, True], ids=["at-load", "anywhere-in-the-file"])
def test_no_two_modules_import_each_other(anywhere: bool) -> None:
    # At load: what Python runs on import. Anywhere: a late import inside a function, or one
    # for type hints only, makes the same circle in the design, so it is refused as well.
    assert cycles(import_graph(anywhere)) == []
