"""nonn's import graph (tests/check_imports.py): no cycles, no upward imports."""

import os

from check_imports import EDGES, cycles, import_graph, upward_imports

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def test_no_import_cycles():
    assert cycles(import_graph(SRC)) == []


def test_no_upward_imports():
    assert upward_imports(import_graph(SRC)) == []


def test_the_core_imports_no_edge():
    graph = import_graph(SRC)
    edges = ("nonn.persistence", "nonn.cli", "nonn.vision", "nonn.distributed",
             "nonn.evaluation", "nonn.datasets", "nonn.synthetic")
    assert set(edges) <= set(EDGES)
    edges = tuple(EDGES)
    core = [m for m in graph if m != "nonn" and not m.startswith(edges)]
    assert "nonn._base" in core and "nonn._model_file" in core
    bad = [(m, d) for m in core for d in graph[m] if d.startswith(edges)]
    assert bad == []


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "nonn"
    (pkg / "cli").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "_a.py").write_text("def f():\n    from . import _b\n")
    (pkg / "_b.py").write_text("from ._a import f\nfrom .cli import main\n")
    (pkg / "cli" / "__init__.py").write_text("def main():\n    pass\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["nonn._a", "nonn._b"]]
    assert upward_imports(graph) == [("nonn._b", "nonn.cli")]
