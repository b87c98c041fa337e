"""Import graph of the ``cmae`` package: edges, cycles and the longest functions.

``python benchmarks/module_graph.py [SRC_DIR]`` (default: src/cmae). Counts every ``import`` of a
``cmae`` module, function-local ones too, so a circle hidden by a local import still shows.
Then checks the rooms' import rule (README "Code layout") and exits 1 if an import runs up:
``models/`` and ``config/`` import only leaf modules (modules that import no ``cmae`` module)
outside themselves; ``data/`` and ``runtime/`` import no ``train/``, ``eval/``, ``interop/``,
``viz/`` or the cli (``runtime/`` no ``config/`` either); ``eval/`` imports no ``train/``; no
cycles.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The cmae modules a file imports (``from cmae.x import y`` counts cmae.x.y if a module)."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules}
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def room(module: str) -> str:
    """``cmae.models.vit`` -> ``models``; the top-level modules are their own room."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


FORBIDDEN = {  # room -> the rooms it must not import
    "data": {"train", "eval", "interop", "viz", "cli", "__main__"},
    # and no config: a runtime piece takes explicit arguments (its errors: cmae.errors)
    "runtime": {"train", "eval", "interop", "viz", "cli", "__main__", "config"},
    "eval": {"train"},
}


def violations(graph: dict[str, set[str]]) -> list[str]:
    leaves = {m for m, deps in graph.items() if not deps}
    found = []
    for m, deps in sorted(graph.items()):
        for d in sorted(deps):
            if room(d) == room(m):
                continue
            if room(m) in ("models", "config") and d not in leaves:
                found.append(f"{m} -> {d} (not a leaf module)")
            if room(d) in FORBIDDEN.get(room(m), ()):
                found.append(f"{m} -> {d} ({room(m)}/ imports no {room(d)}/)")
    return found


def main(root: Path) -> int:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    trees = {m: ast.parse(p.read_text()) for m, p in files.items()}
    # a package's __init__ re-exports are not a dependency of the modules beneath it
    graph = {m: {d for d in imports(t, set(files)) if d != m} for m, t in trees.items()}
    for m in sorted(graph):
        print(f"{m} -> {', '.join(sorted(graph[m])) or '-'}")
    found_cycles = cycles(graph)
    print("cycles:", found_cycles or "none")
    upward = violations(graph)
    print("imports running up:", upward or "none")
    lengths = [
        (n.end_lineno - n.lineno + 1, f"{m}.{n.name}")
        for m, t in trees.items()
        for n in ast.walk(t)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    for length, name in sorted(lengths, reverse=True)[:10]:
        print(f"{length:4d} lines  {name}")
    return 1 if found_cycles or upward else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "src/cmae")))
