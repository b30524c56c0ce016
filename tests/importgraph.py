"""The imports of kvmagent's modules, read from their source with `ast`
(nothing is imported): which module imports which, at module level (when
it is imported) or inside a function (when that function runs).  Imports
under `if TYPE_CHECKING:` are the type checker's only and are marked so.
Dynamic imports (importlib with a name in a string, as kvmagent.cli.main's
commands and kvmagent.unit.forkcall's children do) are not seen here."""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kvmagent"


@dataclass(frozen=True)
class Import:
    target: str  # "kvmagent.config.guests" for kvmagent's own modules, else the dotted name
    in_function: bool  # inside a def or lambda: imported when it runs
    type_checking: bool  # under `if TYPE_CHECKING:`: never at run time
    line: int


def modules() -> list[str]:
    """kvmagent's modules and packages, dotted: "kvmagent", "kvmagent.errors",
    "kvmagent.config" (its __init__), "kvmagent.config.guests", ..."""
    found = []
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(found)


def source(module: str) -> Path:
    """The file of MODULE ("kvmagent.config" is its package's __init__)."""
    base = PACKAGE.parent.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _own(dotted: str) -> str:
    """A dotted name below kvmagent, perhaps ending in a name taken from a
    module ("kvmagent.config.layers.read_toml") -> the module imported."""
    parts = dotted.split(".")
    while len(parts) > 1 and not (source(".".join(parts)).exists()):
        parts.pop()
    return ".".join(parts)


def _package_of(module: str) -> str:
    return module if source(module).name == "__init__.py" else module.rpartition(".")[0]


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [_own(a.name) if a.name.split(".")[0] == "kvmagent" else a.name
                for a in node.names]
    if node.module == "__future__":
        return []
    if node.level:  # relative: from the importing module's package up
        base = _package_of(module).split(".")
        base = base[:len(base) - (node.level - 1)]
        absolute = ".".join(base + ([node.module] if node.module else []))
    else:
        absolute = node.module or ""
    if absolute.split(".")[0] != "kvmagent":
        return [absolute]
    # from kvmagent.config import guests (a module), from kvmagent.paths import Paths (a name)
    return [_own(f"{absolute}.{a.name}") for a in node.names]


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports(module: str) -> list[Import]:
    """The imports in MODULE's source ("kvmagent", "kvmagent.config.guests")."""
    path = source(module)
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend(Import(t, in_function, type_checking, child.lineno)
                             for t in _targets(child, module))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for part in child.body:
                    visit(ast.Module(body=[part], type_ignores=[]), in_function, True)
                for part in child.orelse:
                    visit(ast.Module(body=[part], type_ignores=[]), in_function, type_checking)
            else:
                # A class body runs when its module is imported; a function's when called.
                visit(child, in_function or isinstance(
                    child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)), type_checking)

    visit(ast.parse(path.read_text(), str(path)), False, False)
    return found


def graph(in_functions: bool = True,
          type_checking: bool = False) -> dict[str, dict[str, Import]]:
    """module -> {kvmagent module it imports at run time -> where}; with
    in_functions False, the module-level imports only; with type_checking,
    those under TYPE_CHECKING too (read by a newcomer and by mypy)."""
    edges: dict[str, dict[str, Import]] = {}
    for module in modules():
        edges[module] = {}
        for imp in imports(module):
            if (imp.target.startswith("kvmagent") and (type_checking or not imp.type_checking)
                    and imp.target != module and (in_functions or not imp.in_function)):
                edges[module].setdefault(imp.target, imp)
    return edges


def cycles(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each
    as one cycle through it, from its first module back to it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges) + 100))

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
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
                found.append(_cycle_through(sorted(component), edges))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def _cycle_through(component: list[str], edges: dict[str, dict[str, Import]]) -> list[str]:
    """A path from component[0] back to it, inside the component (breadth first)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges[v]):
            if w == start:
                return paths[v] + [start]
            if w in members and w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return component  # unreachable for a strongly connected component


def describe(cycle: list[str], edges: dict[str, dict[str, Import]]) -> str:
    """"a -> b (line 12, in a function) -> a (line 3)"."""
    parts = [cycle[0]]
    for v, w in zip(cycle, cycle[1:]):
        imp = edges[v][w]
        parts.append(f"{w} ({v} line {imp.line}{', in a function' if imp.in_function else ''})")
    return " -> ".join(parts)
