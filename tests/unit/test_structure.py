"""The shape of the package (docs/architecture.md): no import cycle between swarm's modules,
imports that point one way across the train process boundary, no module over 400 lines.

Every import statement counts: at module level, inside functions and under ``TYPE_CHECKING``
(an import moved into a function to dodge a cycle hides the cycle, it does not remove it),
and ``__import__`` / ``importlib.import_module`` of an f-string such as
``f"swarm.cli.{name}"`` (every module under that prefix). ``from package import name``
points at ``package.name`` when that is a module, else at the package's ``__init__``;
relative imports are resolved against the importing module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import swarm

ROOT = Path(swarm.__file__).parent
MAX_LINES = 400
# Known cycles, each with the reason it stays: none.
KNOWN_CYCLES: list[list[str]] = []


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def source_of(node: ast.ImportFrom, package: str) -> str:
    """The module ``from X import ...`` reads, with a relative X resolved against ``package``."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def dynamic_prefix(node: ast.Call) -> str | None:
    """``P`` of ``__import__(f"P{x}")`` or ``importlib.import_module(f"P{x}")``."""
    func = node.func
    named = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    if named not in ("__import__", "import_module") or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.JoinedStr) and first.values and isinstance(first.values[0], ast.Constant):
        return str(first.values[0].value)
    return None


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The swarm modules that ``path`` (module ``name``) imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = source_of(node, package)
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source)
        elif isinstance(node, ast.Call) and (prefix := dynamic_prefix(node)):
            found.update(m for m in known if m.startswith(prefix) and "." not in m[len(prefix):])
    return {m for m in found if m in known and m != name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imported(name, path, known) for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]], known: list[list[str]] = ()) -> list[str] | None:
    """One cycle as a path (its first module repeated at the end), or None; the edges of
    ``known`` cycles are left out."""
    allowed = {(c[i], c[i + 1]) for c in known for i in range(len(c) - 1)}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if (node, nxt) in allowed:
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def imports_across(graph: dict[str, set[str]], importer: str, imported_prefix: str) -> list[str]:
    """``a -> b`` for every module ``a`` under ``importer`` importing one under ``imported_prefix``."""
    def under(module: str, prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")

    return sorted(f"{a} -> {b}" for a, targets in graph.items() if under(a, importer)
                  for b in targets if under(b, imported_prefix))


def test_the_graph_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "swarm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from swarm.sub.a import f\n")
    (pkg / "sub" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import b\n")
    (pkg / "sub" / "b.py").write_text("def g():\n    from ..sub import c\n    import swarm.top\n")
    (pkg / "sub" / "c.py").write_text("from .. import top\n")
    (pkg / "top.py").write_text("def h(n):\n    return __import__(f'swarm.sub.{n}')\n")
    graph = import_graph(pkg)
    assert graph == {"swarm": set(), "swarm.sub": {"swarm.sub.a"}, "swarm.sub.a": {"swarm.sub.b"},
                     "swarm.sub.b": {"swarm.sub.c", "swarm.top"}, "swarm.sub.c": {"swarm.top"},
                     "swarm.top": {"swarm.sub.a", "swarm.sub.b", "swarm.sub.c"}}
    assert find_cycle(graph) == ["swarm.sub.a", "swarm.sub.b", "swarm.sub.c", "swarm.top", "swarm.sub.a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"a"}}, known=[["a", "b", "a"]]) is None


def test_the_real_graph_holds_what_the_tests_below_rely_on():
    graph = import_graph()
    assert "swarm.plan.decide" in graph["swarm.plan"]  # a package's face, a from-import of a name
    assert "swarm.cli.train" in graph["swarm.cli"]  # the verbs' table, imported by f-string
    assert "swarm.train.worker.loop" in graph["swarm.train.driver.fit"]  # inside a function


def test_no_import_cycle_between_swarms_modules():
    cycle = find_cycle(import_graph(), KNOWN_CYCLES)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_worker_module_imports_the_drivers():
    """The driver hands worker code to Ray Train; a worker never needs the driver's."""
    assert imports_across(import_graph(), "swarm.train.worker", "swarm.train.driver") == []


def test_data_preparation_stands_without_train():
    assert imports_across(import_graph(), "swarm.data", "swarm.train") == []


def test_no_module_over_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
