"""The package's shape, checked by `make lint`: no import cycles, import chains at most 10
modules deep, no module over 600 lines, no function over 80 lines.

Imports are read from the source (ast), never executed. A cycle counts every import, deferred
ones (inside functions) included; imports under `if TYPE_CHECKING:` are annotations and never
run, so they count for nothing. An import chain is what importing a module imports in turn at
import time: module-level imports only (deferred ones run later, when a function needs them;
the layering of all of them is import-linter's contract, .importlinter).

    python .ci/structure.py [PACKAGE_DIR]     exit 1 and one line per problem when broken
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_CHAIN = 10
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Graph:
    """Each module's imports of the package's own modules: all of them, and import-time ones."""

    modules: dict[str, Path]
    every: dict[str, set[str]]
    at_import: dict[str, set[str]]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def type_checking_nodes(tree: ast.Module) -> set[int]:
    """Every node under an `if TYPE_CHECKING:` block (by id)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for inner in ast.walk(node))
    return skipped


def imported(node: ast.AST, package: str) -> Iterator[str]:
    """The dotted names an import statement may bind (a module, or a name in one)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the module's own package upwards
            parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            base = f"{parent}.{base}" if base else parent
        yield base
        yield from (f"{base}.{alias.name}" for alias in node.names)


def read_graph(root: Path) -> Graph:
    modules = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    every: dict[str, set[str]] = {m: set() for m in modules}
    at_import: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        skipped = type_checking_nodes(tree)
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if id(node) in skipped or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = {t for t in imported(node, package) if t in modules and t != name}
            every[name] |= targets
            if id(node) in top:
                at_import[name] |= targets
    return Graph(modules, every, at_import)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def longest_chain(edges: dict[str, set[str]]) -> list[str]:
    """The longest import chain (edges must have no cycle), its modules in order."""
    memo: dict[str, list[str]] = {}

    def chain(v: str) -> list[str]:
        if v not in memo:
            below = [chain(w) for w in sorted(edges[v])]
            memo[v] = [v, *max(below, key=len, default=[])]
        return memo[v]

    return max((chain(v) for v in sorted(edges)), key=len, default=[])


def long_functions(path: Path, limit: int) -> Iterator[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            length = (node.end_lineno or node.lineno) - first + 1
            if length > limit:
                yield f"{path}:{first}: function {node.name} is {length} lines (at most {limit})"


def problems(root: Path) -> list[str]:
    graph = read_graph(root)
    found = [f"import cycle: {' -> '.join(c)}" for c in cycles(graph.every)]
    found += [f"import cycle at import time: {' -> '.join(c)}" for c in cycles(graph.at_import)]
    if not found:
        chain = longest_chain(graph.at_import)
        if len(chain) > MAX_CHAIN:
            found.append(f"import chain of {len(chain)} modules (at most {MAX_CHAIN}): "
                         + " -> ".join(chain))  # fmt: skip
    for path in graph.modules.values():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{path}: {lines} lines (at most {MAX_MODULE_LINES})")
        found += long_functions(path, MAX_FUNCTION_LINES)
    return found


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else "indexer")
    graph = read_graph(root)
    found = problems(root)
    for problem in found:
        print(problem)
    if not found:
        chain = longest_chain(graph.at_import)
        deferred = longest_chain(graph.every)
        print(f"{len(graph.modules)} modules, no import cycle; the longest import chain is "
              f"{len(chain)} modules ({len(deferred)} with deferred imports)")  # fmt: skip
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
