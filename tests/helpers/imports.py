"""What the modules of ``src/tmerge`` import, read from their source (nothing is executed).

Every import statement counts, wherever it stands: at the top, inside a function (a lazy import),
under ``if TYPE_CHECKING:``. So does a module named by a string that the module hands to
``importlib.import_module`` (the CLI's command table, ``tmerge.data``'s lazy exports). The
implicit import of a parent package (``tmerge.data`` before ``tmerge.data.formats``) does not: it
runs the package's ``__init__`` but is no dependency of the importing module's code.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


@dataclass(frozen=True)
class Import:
    """One import of a module: the name imported (``torch.nn``, ``tmerge.merge.imm``), the names
    taken from it (``from x import a, b``; empty for ``import x``), and its line."""

    module: str
    names: tuple[str, ...]
    line: int


def modules(src: Path = SRC, package: str = "tmerge") -> dict[str, Path]:
    """Every module of ``package`` under ``src``: dotted name → file (a package is its ``__init__``)."""
    found = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path) -> Iterator[Import]:
    """Every import of the module ``name`` (its file ``path``), relative ones made absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            yield Import(base, tuple(a.name for a in node.names), node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "import_module":
            dynamic = True
    if dynamic:
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.startswith("tmerge.")
            ):
                yield Import(node.value, (), node.lineno)


def _owner(name: str, known: Mapping[str, Path]) -> str | None:
    """The deepest module of ``known`` that ``name`` is or lies in."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(known: Mapping[str, Path] | None = None) -> dict[str, set[str]]:
    """Module → the tmerge modules it imports (``from pkg import mod`` names the submodule)."""
    known = modules() if known is None else known
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets: set[str] = set()
        for imp in imports(name, path):
            if imp.module.split(".")[0] != "tmerge":
                continue
            subs = [f"{imp.module}.{n}" for n in imp.names if f"{imp.module}.{n}" in known]
            targets.update(subs)
            if len(subs) < len(imp.names) or not imp.names:  # names of the module itself
                owner = _owner(imp.module, known)
                if owner is not None:
                    targets.add(owner)
        graph[name] = targets - {name}
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every
    module of one can reach every other, so each holds an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycle_path(graph: Mapping[str, set[str]], component: list[str]) -> list[str]:
    """One import cycle through ``component``'s first module, ``a → b → … → a``, for a message."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    return component
