"""The rules of this test suite itself (tests/conftest.py), checked by
running pytest on small throwaway test files: a test that waits too long
fails with a message and its fixtures are torn down; in CI every skip, even
one at collection, is a failure; a missing machine property skips with the
property named."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

HANGS = '''
import os, pytest

@pytest.fixture
def resource(tmp_path_factory):
    mark = os.environ["MARK"]
    open(mark, "w").write("set up\\n")
    yield
    open(mark, "a").write("torn down\\n")

@pytest.mark.timeout(1)
def test_waits_for_eof_forever(resource):
    r, w = os.pipe()
    os.read(r, 1)  # nobody writes, nobody closes: blocks

@pytest.mark.timeout(1)
def test_spins_on_eof(resource):
    got = b""
    while b"never" not in got:
        got += b""  # a recv() that returns b"" at EOF, forever

def test_quick():
    pass
'''

SKIPS = '''
import pytest

def test_skips():
    pytest.skip("no such thing here")

@pytest.mark.kvm
@pytest.mark.root
def test_needs_a_property():
    pass
'''

MODULE_SKIP = '''
import pytest
pytest.importorskip("kvmagent_no_such_module")

def test_never_collected():
    pass
'''


def inner_pytest(tmp_path: Path, files: dict[str, str], **env: str
                 ) -> subprocess.CompletedProcess[str]:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider -rA\n")
    full = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO),
            "HOME": str(tmp_path), **env}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest",
                           "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path),
                           "--basetemp", str(tmp_path / "basetemp"), *files],
                          cwd=tmp_path, env=full, text=True, capture_output=True, timeout=90)


def test_a_test_that_waits_too_long_fails_and_is_torn_down(tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    t0 = time.monotonic()
    r = inner_pytest(tmp_path, {"test_hangs.py": HANGS}, MARK=str(mark))
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 failed, 1 passed" in r.stdout, r.stdout
    assert r.stdout.count("TIME LIMIT: test_hangs.py::test_") >= 2, r.stdout
    assert "took longer than 1 s" in r.stdout
    assert "os.read(r, 1)" in r.stdout  # the traceback shows where it waited
    assert mark.read_text() == "set up\ntorn down\n"  # the last test's fixture, torn down
    assert took < 60, f"{took:.0f} s"


def test_every_skip_fails_in_ci_and_only_there(tmp_path: Path) -> None:
    files = {"test_skips.py": SKIPS, "test_module_skip.py": MODULE_SKIP}
    lax = inner_pytest(tmp_path, files, KVMAGENT_STRICT="0", CI="")
    assert lax.returncode == 0, lax.stdout + lax.stderr
    assert "could not import 'kvmagent_no_such_module'" in lax.stdout
    strict = inner_pytest(tmp_path, {"test_skips.py": SKIPS}, KVMAGENT_STRICT="1")
    assert strict.returncode == 1, strict.stdout
    assert "skipped in CI, which counts as a failure: no such thing here" in strict.stdout
    assert "skipped" not in strict.stdout.splitlines()[-1], strict.stdout
    # at collection: an error, which also stops the run
    strict = inner_pytest(tmp_path, {"test_module_skip.py": MODULE_SKIP}, CI="true")
    assert strict.returncode == 2, strict.stdout
    assert "skipped in CI, which counts as a failure: could not import " \
        "'kvmagent_no_such_module'" in strict.stdout, strict.stdout
    assert "1 error" in strict.stdout.splitlines()[-1], strict.stdout


def test_machine_properties_are_named_in_the_skip(tmp_path: Path) -> None:
    """Whichever property this machine lacks, the skip says which; a machine
    that has them all runs the test."""
    r = inner_pytest(tmp_path, {"test_skips.py": SKIPS}, KVMAGENT_STRICT="0", CI="")
    root = os.geteuid() == 0
    kvm = os.access("/dev/kvm", os.R_OK | os.W_OK) and os.path.exists("/dev/kvm")
    not_run = [ln for ln in r.stdout.splitlines() if "NOT RUN:" in ln]  # only that test's
    if root and kvm:
        assert "1 passed, 1 skipped" in r.stdout and not not_run, r.stdout
    else:
        (line,) = not_run
        assert line.startswith("SKIPPED") and "2 skipped" in r.stdout, r.stdout
        assert ("needs root" in line) == (not root), line
        assert ("/dev/kvm" in line) == (not kvm), line


def test_seed_configurations_are_loaded_through_their_private_copy() -> None:
    """kvmagent refuses configuration files other users can change, so a test
    that loads tests/data/seed in place fails in a checkout owned by another
    user (`sudo make check` in one's own clone): tests/seed.py copies them."""
    offenders = [str(path.relative_to(REPO)) for path in sorted((REPO / "tests").rglob("*.py"))
                 if path != REPO / "tests" / "seed.py"
                 and re.search(r"""["']seed["']\s*[,)]|/ *["']seed["']""", path.read_text())]
    assert offenders == [], f"load the seed files with tests.seed.copy(): {offenders}"


def test_test_files_have_names_unique_across_the_suite() -> None:
    """pytest imports a test folder without __init__.py by its file's basename,
    so tests/unit/test_x.py and tests/system/test_x.py cannot both be
    collected in one run: the second is an error at collection."""
    seen: dict[str, list[str]] = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        if not (path.parent / "__init__.py").exists():
            seen.setdefault(path.name, []).append(str(path.relative_to(REPO)))
    assert {name: where for name, where in seen.items() if len(where) > 1} == {}


ENSURE = re.compile(r'"bridge", "ensure", ("[\w-]+"|[A-Z_]+), "--address", "([\d.]+)/(\d+)"')


def test_one_bridge_per_test_subnet() -> None:
    """The system tests share a test host: two bridges given addresses in one
    subnet make two routes to it, and the host's answers to a guest on one
    of them leave through the other (a test's guest that cannot ping its
    host, only after another test file ran)."""
    bridges: dict[str, set[str]] = {}
    for path in sorted((REPO / "tests").rglob("*.py")):
        text = path.read_text()
        for name, address, prefix in ENSURE.findall(text):
            if not name.startswith('"'):  # a module constant: NAME = "br-x"
                const = re.search(rf'^{name} = ("[\w-]+")$', text, re.M)
                assert const, f"{path}: {name} is not a module constant"
                name = const.group(1)
            net = ".".join(address.split(".")[:int(prefix) // 8])
            bridges.setdefault(f"{net}/{prefix}", set()).add(name.strip('"'))
    assert len(bridges) >= 2, bridges  # the scan finds the suite's bridges
    assert {net: b for net, b in bridges.items() if len(b) > 1} == {}
