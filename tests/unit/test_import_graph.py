"""No import circles among kvmagent's modules (tests/importgraph.py reads
their imports from the source).  A circle makes the order of imports
matter, and let the long-lived supervisor import a command's module
through a shared name (kvmagent.unit.recorder once took the name of the file it
writes from kvmagent.cli.main, which imports the supervisor): a name that two
modules share belongs to a lower module that imports neither
(kvmagent.lifecycle, kvmagent.paths)."""

from __future__ import annotations

from tests import importgraph

# kvmagent's layers, lowest first: a module imports from its own layer or a
# lower one, never a higher one.  The top-level modules (errors, paths, names,
# lifecycle) are the names every layer shares; README's Layout says the rest.
LAYERS = ("kvmagent", "kvmagent.config", "kvmagent.foreign", "kvmagent.render", "kvmagent.host",
          "kvmagent.unit", "kvmagent.cli")


def layer(module: str) -> int:
    """The index in LAYERS of MODULE's layer ("kvmagent.errors": 0);
    `python3 -m kvmagent` (kvmagent.__main__) is the command line's."""
    if module == "kvmagent.__main__":
        return LAYERS.index("kvmagent.cli")
    parts = module.split(".")
    return LAYERS.index(".".join(parts[:2]) if len(parts) > 2 or (
        len(parts) == 2 and importgraph.source(module).name == "__init__.py") else "kvmagent")


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


def test_no_circle_counting_imports_for_types() -> None:
    """An import under TYPE_CHECKING runs never, but a reader follows it as
    any other: a module that needs another's type for its parameters
    belongs below it (e.g. kvmagent.unit.held below the supervisor)."""
    edges = importgraph.graph(in_functions=True, type_checking=True)
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
    recorder = {i.target: i for i in importgraph.imports("kvmagent.unit.recorder")}
    assert not recorder["kvmagent.lifecycle"].in_function
    assert recorder["kvmagent.host.state"].in_function
    run = importgraph.imports("kvmagent.unit.run")
    assert any(i.target == "kvmagent.paths" and i.type_checking for i in run)
    assert any(i.target == "kvmagent.unit.supervisor" and i.in_function for i in run)
    assert "kvmagent.paths" in importgraph.graph()["kvmagent.unit.run"]
    supervisor = {i.target for i in importgraph.imports("kvmagent.unit.supervisor")}
    assert {"kvmagent", "kvmagent.unit.forkcall", "kvmagent.host.qmp", "select"} <= supervisor


def test_every_module_has_a_layer() -> None:
    """A new subpackage is a new layer: it goes into LAYERS (and README's
    Layout) on purpose."""
    packages = {m for m in importgraph.modules() if importgraph.source(m).name == "__init__.py"}
    assert packages == set(LAYERS)


def test_imports_go_down_the_layers() -> None:
    """Configuration needs nothing but the shared names; rendering turns a
    guest into QEMU's argv and systemd's settings; the host adapters may
    use both; the unit's processes (the supervisor and its helpers) use the
    adapters; the command line sits on top.  The supervisor thus never
    imports a command's module, and the pure layers no adapter."""
    wrong = [f"{module} (line {imp.line}) imports {target}"
             for module, targets in importgraph.graph().items()
             for target, imp in targets.items() if layer(target) > layer(module)]
    assert not wrong, "imports up the layers:\n" + "\n".join(wrong)


def test_the_layer_rule_sees_an_import_up() -> None:
    assert layer("kvmagent.errors") == 0 < layer("kvmagent.config") == layer(
        "kvmagent.config.guests") < layer("kvmagent.cli.main")


def test_packages_import_nothing() -> None:
    """A subpackage's __init__ is its docstring: importing one module of a
    layer brings no other."""
    busy = {m: [i.target for i in importgraph.imports(m)]
            for m in LAYERS[1:] if importgraph.imports(m)}
    assert not busy


# What the pure layers may import besides kvmagent's own: modules that touch
# no file, process, socket or clock (pathlib and posixpath for names of
# paths, never to read them).
PURE_LAYERS = ("kvmagent.foreign", "kvmagent.render")
PURE_IMPORTS = {"__future__", "ast", "collections.abc", "copy", "dataclasses", "enum", "errno",
                "ipaddress", "json", "math", "pathlib", "posixpath", "re", "shlex", "textwrap",
                "types", "typing", "xml.etree.ElementTree", "xml.sax.saxutils"}


def impure(module: str) -> list[importgraph.Import]:
    """MODULE's imports that are neither kvmagent's nor in PURE_IMPORTS."""
    return [i for i in importgraph.imports(module)
            if not i.target.startswith("kvmagent") and i.target not in PURE_IMPORTS]


def test_the_pure_layers_touch_nothing() -> None:
    """Importing and decisions (foreign, render) are pure: they get facts
    and the clock passed in and return plain data, so that their unit tests
    need no host.  A module that wants os, subprocess, socket, sqlite3 or
    time belongs in host/ (an adapter) and passes what it found down."""
    wrong = [f"{m} (line {i.line}) imports {i.target}"
             for m in importgraph.modules() if m.startswith(PURE_LAYERS) for i in impure(m)]
    assert not wrong, "the pure layers import:\n" + "\n".join(wrong)


def test_the_purity_rule_sees_an_adapter() -> None:
    """The rule, applied to an adapter, finds what makes it one."""
    assert {"os", "sqlite3", "time"} <= {i.target for i in impure("kvmagent.host.state")}
