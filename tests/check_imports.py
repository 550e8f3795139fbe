"""The import graph of ``src/nonn``, read from the source (AST), and its rules.

Run as a script to print the graph's cycles and upward imports; the test
suite (``tests/test_import_graph.py``) asserts there are none.

Rules:

* no cycles among nonn's modules (imports inside functions count: a lazy
  import is still a dependency);
* the core (every module outside the edge packages and modules below)
  never imports an edge;
* an edge never imports another edge, except the command line, which sits
  on top of everything.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "nonn"
#: the edges above the core: (module-name prefix, may import these other edges)
EDGES = {
    "nonn.persistence": (),
    "nonn.cli": ("nonn.persistence", "nonn.vision", "nonn.distributed", "nonn.evaluation",
                 "nonn.datasets", "nonn.synthetic", "nonn.__main__"),
    "nonn.__main__": ("nonn.cli",),
    "nonn.vision": ("nonn.persistence", "nonn.datasets"),
    "nonn.distributed": ("nonn.persistence",),
    "nonn.evaluation": ("nonn.datasets", "nonn.vision", "nonn.synthetic"),
    "nonn.datasets": (),
    "nonn.synthetic": ("nonn.evaluation",),
}


def module_name(path, root):
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(node, current, is_package):
    """Absolute module names an import node refers to (nonn's only)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    base = current if is_package else current.rpartition(".")[0]
    for _ in range(max(node.level - 1, 0)):
        base = base.rpartition(".")[0]
    mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
    if not mod or mod.split(".")[0] != PACKAGE:
        return []
    # "from .pkg import name": name is a submodule, or a name defined in pkg
    return [(f"{mod}.{a.name}", mod) for a in node.names]


def import_graph(src):
    """``{module: set of nonn modules it imports}`` for every module under
    ``src/nonn`` (only edges to modules that exist)."""
    root = Path(src)
    files = {module_name(p, root): p for p in (root / PACKAGE).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps.update(d for d in _resolve(node, name, False) if d in files)
            elif isinstance(node, ast.ImportFrom):
                for sub, parent in _resolve(node, name, path.name == "__init__.py"):
                    deps.add(sub if sub in files else parent)
        # a module's own packages run before it anyway: not a dependency
        graph[name] = {d for d in deps if d in files and d != name
                       and not name.startswith(d + ".")}
    # importing a.b.c runs a.b's __init__ (unless the importer is inside a.b)
    for name, deps in graph.items():
        for d in list(deps):
            parts = d.split(".")
            for i in range(2, len(parts)):
                anc = ".".join(parts[:i])
                if anc in files and anc != name and not name.startswith(anc + "."):
                    deps.add(anc)
    return graph


def cycles(graph):
    """Every elementary cycle's node set (strongly connected components of
    more than one module, or self-loops)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _edge_of(module):
    return next((e for e in EDGES if module == e or module.startswith(e + ".")), None)


#: the package's public face: it may re-export from the edges (``nonn.load``)
FACADE = "nonn"


def upward_imports(graph):
    """``(importer, imported)`` pairs that break the layering rules."""
    bad = []
    for mod, deps in graph.items():
        if mod == FACADE:
            continue
        mine = _edge_of(mod)
        for d in deps:
            theirs = _edge_of(d)
            if theirs is None or theirs == mine:
                continue
            if mine is None or theirs not in EDGES[mine]:
                bad.append((mod, d))
    return sorted(bad)


def main(src="src"):
    graph = import_graph(src)
    found = cycles(graph)
    bad = upward_imports(graph)
    for c in found:
        print("cycle:", " <-> ".join(c))
    for a, b in bad:
        print(f"upward import: {a} -> {b}")
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, {len(found)} "
          f"cycles, {len(bad)} upward imports")
    return 1 if found or bad else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
