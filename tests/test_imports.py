"""No import cycles among the package's imports, module-level or inside functions.

The graph is read from the source with ``ast`` (nothing is imported but the package itself). A cycle among
module-level imports can fail at import time; one through an import inside a function cannot, but it hides the
same tangle (the modules cannot be read, tested or changed apart), so it is refused too. Only imports for
annotations (``if TYPE_CHECKING:``) are left out.
"""
from __future__ import annotations

import ast
from pathlib import Path

import permcompile

PACKAGE = Path(permcompile.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if not level:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(tree: ast.Module, local: bool):
    """The import statements of ``tree``: its top level only, or (``local``) every one, inside functions too;
    never those under ``if TYPE_CHECKING:``."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif local:
            todo.extend(ast.iter_child_nodes(node))


def import_graph(local: bool = False) -> dict[str, set[str]]:
    """``module -> permcompile modules it imports`` at module level, or anywhere with ``local`` (``if
    TYPE_CHECKING:`` blocks excluded; ``from pkg import name`` counts ``pkg.name`` when that is a module, else
    ``pkg``)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path)), local):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    deps.add(sub if sub in files else base)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_graph_sees_the_package():
    graph = import_graph()
    assert "permcompile.export.verify" in graph
    assert "permcompile.export.ort_session" in graph["permcompile.export.verify"]


def test_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_graph_sees_imports_inside_functions():
    # pipeline imports the verifier inside its verify step (start-up time), and the learned pass imports
    # LearnedConfig for annotations only
    assert "permcompile.export.verify" not in import_graph()["permcompile.pipeline"]
    assert "permcompile.export.verify" in import_graph(local=True)["permcompile.pipeline"]
    assert "permcompile.config" not in import_graph(local=True)["permcompile.passes.learned"]


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_no_import_cycles_through_imports_inside_functions():
    assert find_cycles(import_graph(local=True)) == []
