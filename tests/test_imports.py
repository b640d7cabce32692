"""The import structure of ``src/tmerge`` (docs/architecture.md), read from the source.

No module imports, even lazily, a module that imports it back; and the pure layer (tensors in,
tensors out) stays pure: no user errors, no Lightning, no files.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers.imports import cycle_path, cycles, import_graph, imports, modules

#: The pure layer: maths on tensors. Its errors are ValueError/TypeError (the stages turn the
#: user's faults into tmerge.errors); it neither trains nor reads or writes files.
PURE = (
    "tmerge.fisher",
    "tmerge.merge",
    "tmerge.nets",
    "tmerge.transfer",
    "tmerge.metrics",
    "tmerge.stateless",
)
#: Config validation that refuses a key with the user's error, inside the pure layer.
USER_ERRORS_ALLOWED = {"tmerge.nets.config"}
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")
#: Modules whose job is files: tmerge's own, the formats' and Python's.
FILE_IO = (
    "tmerge.io",
    "tmerge.runs",
    "tmerge.sources",
    "tmerge.artifacts",
    "tmerge.paths",
    "safetensors",
    "nibabel",
    "SimpleITK",
    "h5py",
    "json",
    "csv",
    "pickle",
    "yaml",
    "omegaconf",
    "shutil",
    "tempfile",
    "gzip",
    "zipfile",
)
#: Calls that read or write a file: ``open(…)``, ``path.read_text()`` and the like, ``torch.load`` …
FILE_METHODS = {"read_text", "write_text", "read_bytes", "write_bytes"}
ARRAY_FILES = {("torch", "load"), ("torch", "save"), ("np", "load"), ("np", "save"), ("np", "savez")}


def _is_pure(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PURE)


def _within(module: str, roots: tuple[str, ...]) -> bool:
    return any(module == r or module.startswith(r + ".") for r in roots)


def _file_calls(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "open":
            found.append((node.lineno, "open()"))
        elif isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else None
            if func.attr in FILE_METHODS or (owner, func.attr) in ARRAY_FILES:
                found.append((node.lineno, f"{owner or '…'}.{func.attr}()"))
    return found


def test_no_import_cycle_among_tmerge_modules() -> None:
    """Counting imports inside functions and under TYPE_CHECKING: a lazy import that closes a
    circle still ties the two modules' designs together."""
    graph = import_graph()
    assert len(graph) > 50 and graph["tmerge.cli"], "the scan found the package"
    found = [" → ".join(cycle_path(graph, c)) for c in cycles(graph)]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_pure_code_imports_no_user_errors_lightning_or_file_io() -> None:
    known = modules()
    pure = {n: p for n, p in known.items() if _is_pure(n)}
    assert {"tmerge.fisher", "tmerge.merge.imm", "tmerge.nets.config", "tmerge.transfer"} <= set(pure)
    faults = []
    for name, path in pure.items():
        for imp in imports(name, path):
            if _within(imp.module, ("tmerge.errors",)) and name not in USER_ERRORS_ALLOWED:
                faults.append(f"{name}:{imp.line} imports the user errors ({imp.module})")
            elif _within(imp.module, LIGHTNING):
                faults.append(f"{name}:{imp.line} imports Lightning ({imp.module})")
            elif _within(imp.module, FILE_IO):
                faults.append(f"{name}:{imp.line} imports file I/O ({imp.module})")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        faults += [f"{name}:{line} calls {call}" for line, call in _file_calls(tree)]
    assert not faults, "\n".join(faults)


def test_the_scan_sees_lazy_imports_and_cycles(tmp_path: Path) -> None:
    """The scan itself: a function-level import and a TYPE_CHECKING one are edges, and a circle
    through them is found."""
    source = {
        "a": "def f():\n    from b import x\n",
        "b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import c\n",
        "c": "import a\n",
    }
    graph = {}
    for name, text in source.items():
        (tmp_path / f"{name}.py").write_text(text)
        graph[name] = {i.module for i in imports(name, tmp_path / f"{name}.py")}
    assert graph == {"a": {"b"}, "b": {"typing", "c"}, "c": {"a"}}
    graph["b"].discard("typing")
    assert cycles(graph) == [["a", "b", "c"]] and cycle_path(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
