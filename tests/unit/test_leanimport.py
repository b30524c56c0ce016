"""kvmagent.host.leanimport.import_without: a module imported with a stand-in for
a dependency it needs only on a rare path, on made-up modules."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kvmagent.host import leanimport

MODULES = ("lean_dep", "lean_mod", "lean_helper", "lean_broken")


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "lean_dep.py").write_text(
        "LOADED = True\ndef f(x):\n    return ('real f', x)\ndef g():\n    return 'real g'\n")
    (tmp_path / "lean_helper.py").write_text("import lean_dep\n")
    (tmp_path / "lean_mod.py").write_text("import lean_helper\nfrom lean_dep import f\n")
    (tmp_path / "lean_broken.py").write_text("from lean_dep import f\nraise RuntimeError('no')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in MODULES:
        sys.modules.pop(name, None)


def test_the_dependency_is_loaded_when_its_name_is_called(modules: Path) -> None:
    leanimport.import_without("lean_mod", "lean_dep", "f")
    assert "lean_mod" in sys.modules and "lean_dep" not in sys.modules
    import lean_mod
    assert lean_mod.f(1) == ("real f", 1)
    assert sys.modules["lean_dep"].LOADED


def test_a_module_imported_meanwhile_gets_the_real_names(modules: Path) -> None:
    """lean_helper imported the dependency while the stand-in stood in for
    it: any other name it asks for loads the real module."""
    leanimport.import_without("lean_mod", "lean_dep", "f")
    import lean_helper
    assert lean_helper.lean_dep.g() == "real g"
    assert sys.modules["lean_dep"].__file__.endswith("lean_dep.py")
    assert lean_helper.lean_dep.f(2) == ("real f", 2)


def test_fixed_names_are_held_as_they_are(modules: Path) -> None:
    """A name the module takes as it loads and keeps (a class) is the fixed
    value: the real dependency stays unloaded."""
    (modules / "lean_cls.py").write_text("from lean_dep import Error, f\n")
    try:
        class Stand(Exception):
            pass
        leanimport.import_without("lean_cls", "lean_dep", "f", Error=Stand)
        import lean_cls
        assert lean_cls.Error is Stand and "lean_dep" not in sys.modules
        assert lean_cls.f(3) == ("real f", 3)
    finally:
        sys.modules.pop("lean_cls", None)


def test_a_failed_import_leaves_no_stand_in(modules: Path) -> None:
    with pytest.raises(RuntimeError):
        leanimport.import_without("lean_broken", "lean_dep", "f")
    assert "lean_dep" not in sys.modules
    import lean_dep
    assert lean_dep.LOADED


def test_an_imported_dependency_is_used_as_it_is(modules: Path) -> None:
    import lean_dep
    leanimport.import_without("lean_mod", "lean_dep", "f")
    import lean_mod
    assert lean_mod.f is lean_dep.f


def test_a_library_without_what_kvmagent_takes_is_a_host_error(tmp_path: Path) -> None:
    """Another pystemd or pyroute2 than Debian 12's and 13's: a host error
    (exit 5) naming the library and what it lacks, not a traceback."""
    import subprocess
    fake = tmp_path / "pystemd"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "dbusexc.py").write_text("class DBusBaseError(Exception):\n    pass\n")
    (fake / "dbuslib.py").write_text("class DBus: pass\nclass DbusMessage: pass\n"
                                     "def path_encode(p): return p\n")  # no apply_signature
    repo = Path(__file__).resolve().parents[2]
    code = ("from kvmagent.errors import KvmagentError\n"
            "try:\n    import kvmagent.host.systemd\n"
            "except KvmagentError as e:\n    print(int(e.status), e.message, '|', e.hint)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": f"{tmp_path}:{repo}"}, check=True).stdout
    assert out.startswith("5 the installed pystemd "), out
    assert "cannot import name 'apply_signature' from 'pystemd.dbuslib'" in out
    assert "install python3-pystemd from this release" in out
