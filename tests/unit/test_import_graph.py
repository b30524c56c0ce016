"""No import circles among kvmagent's modules (tests/importgraph.py reads
their imports from the source).  A circle makes the order of imports
matter, and let the long-lived supervisor import a command's module
through a shared name (kvmagent.recorder once took the name of the file it
writes from kvmagent.cli, which imports the supervisor): a name that two
modules share belongs to a lower module that imports neither
(kvmagent.lifecycle, kvmagent.paths)."""

from __future__ import annotations

from tests import importgraph


def test_no_circle_among_module_level_imports() -> None:
    edges = importgraph.graph(in_functions=False)
    found = [importgraph.describe(c, edges) for c in importgraph.cycles(edges)]
    assert not found, "import circles:\n" + "\n".join(found)


def test_no_circle_counting_imports_inside_functions() -> None:
    """An import inside a function is a circle too, if the function runs:
    it only comes later."""
    edges = importgraph.graph(in_functions=True)
    found = [importgraph.describe(c, edges) for c in importgraph.cycles(edges)]
    assert not found, "import circles:\n" + "\n".join(found)


def test_the_graph_sees_a_circle() -> None:
    """The checker itself: a circle of three, one edge inside a function."""
    imp = importgraph.Import
    edges = {"a": {"b": imp("b", False, False, 1)}, "b": {"c": imp("c", True, False, 2)},
             "c": {"a": imp("a", False, False, 3)}, "d": {"a": imp("a", False, False, 4)}}
    assert importgraph.cycles(edges) == [["a", "b", "c", "a"]]
    assert importgraph.describe(["a", "b", "c", "a"], edges) == (
        "a -> b (a line 1) -> c (b line 2, in a function) -> a (c line 3)")


def test_the_graph_reads_every_kind_of_import() -> None:
    """`from . import x`, `from .x import y`, a function's import, and one
    under TYPE_CHECKING (not a run-time edge) are all read."""
    recorder = {i.target: i for i in importgraph.imports("kvmagent.recorder")}
    assert not recorder["kvmagent.lifecycle"].in_function
    assert recorder["kvmagent.state"].in_function
    run = importgraph.imports("kvmagent.run")
    assert any(i.target == "kvmagent.paths" and i.type_checking for i in run)
    assert any(i.target == "kvmagent.supervisor" and i.in_function for i in run)
    assert "kvmagent.paths" in importgraph.graph()["kvmagent.run"]
    supervisor = {i.target for i in importgraph.imports("kvmagent.supervisor")}
    assert {"kvmagent", "kvmagent.forkcall", "kvmagent.qmp", "subprocess"} <= supervisor
