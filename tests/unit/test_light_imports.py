"""What `kvmagent run` (the long-lived supervisor of a guest) and the short
ways of kvmagent.cli.main import, measured: each runs for real in a fresh
/usr/bin/python3, and sys.modules is read where it matters.

`run NAME` for a guest that does not exist goes the supervisor's own way
up to its first system call that needs root or QEMU: the planner child is
forked (sys.modules is read just before that fork), the supervisor imports
its modules while the planner fails, records the failure (in a forked
writer) and exits (read again at its os._exit).  Nothing is stubbed but
the journal's socket (so that the host's journal gets nothing; the
supervisor then writes to stderr, as it does without journald).  What it
would import later in a guest's life, inside a function, is read from the
source (tests/importgraph.py): a supervisor module may import only what the
supervisor holds anyway, or what runs in a forked child.

The rule: every module is from the standard library (sys.stdlib_module_names
of the Python running the test: 3.11 and 3.13 differ) or named below, and
the kvmagent and third-party modules are exactly the ones named.  A module
added to the supervisor is added to these sets on purpose, or this fails."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import importgraph

REPO = Path(__file__).resolve().parents[2]

# kvmagent run NAME, when it forks the planner: the command line only.
RUN_BEFORE_FORK = {"kvmagent", "kvmagent.cli", "kvmagent.cli.main", "kvmagent.errors",
                   "kvmagent.lifecycle", "kvmagent.unit", "kvmagent.unit.forkcall",
                   "kvmagent.unit.run"}
# ... and the supervisor for the rest of the guest's life: standard library
# and kvmagent's light modules, no third-party module at all.
SUPERVISOR = RUN_BEFORE_FORK | {
    "kvmagent.names", "kvmagent.paths",
    "kvmagent.render", "kvmagent.render.plan", "kvmagent.render.records",
    # live migration: its decisions (pure) and the supervisor's part (#20)
    "kvmagent.render.migration", "kvmagent.unit.migration",
    # and its disks' copy (migrate --copy-storage)
    "kvmagent.render.storagecopy", "kvmagent.unit.mirror",
    "kvmagent.host", "kvmagent.host.qmp", "kvmagent.host.sdnotify", "kvmagent.host.tundev",
    "kvmagent.unit.adopt", "kvmagent.unit.channel", "kvmagent.unit.consolelog", "kvmagent.unit.held",
    "kvmagent.unit.launch", "kvmagent.unit.messages", "kvmagent.unit.protocol",
    "kvmagent.unit.recorder",
    "kvmagent.unit.stoppolicy", "kvmagent.unit.takeover", "kvmagent.unit.testhook",
    "kvmagent.unit.supervisor", "kvmagent.unit.viewers"}
# Standard-library modules the supervisor must not hold: dataclasses brings
# inspect, and inspect ast, dis and tokenize (~270 KiB or more per guest at
# 50 guests: bench/supervisor_memory.py; kvmagent.paths and kvmagent.unit.stoppolicy
# use NamedTuple and small classes with __slots__ instead).
NOT_IN_SUPERVISOR = {"dataclasses", "inspect", "ast", "dis", "tokenize"}
# Imports inside a supervisor module's functions that run in a forked child
# only: module -> what it may import there.
IN_CHILDREN_ONLY = {"kvmagent.unit.recorder": {"kvmagent.host.state", "kvmagent.unit.stoppost"}}
# The entry of the process: its imports on the way to the supervisor are all
# seen by the measurement (straight-line code); its other ways are not this one.
ENTRY = {"kvmagent.cli.main", "kvmagent.unit.run"}

# kvmagent list [--json]: systemd asked over pystemd's D-Bus module alone.
# (kvmagent.host.migrations: the state database's schema, which state.py
# held before it grew a fourth version; the reader checks the version.)
LIST = {"kvmagent", "kvmagent.errors", "kvmagent.lifecycle", "kvmagent.paths",
        "kvmagent.cli", "kvmagent.cli.main", "kvmagent.cli.tracking", "kvmagent.cli.hostlist",
        "kvmagent.config", "kvmagent.config.values",
        "kvmagent.host", "kvmagent.host.leanimport", "kvmagent.host.migrations",
        "kvmagent.host.state", "kvmagent.host.systemd",
        "kvmagent.render", "kvmagent.render.unitprops", "kvmagent.render.uptime"}
# ... when a guest's file changed since the last listing: it is read again.
LIST_CHANGED = LIST | {"kvmagent.config.layers", "kvmagent.names"}
# pystemd's modules that its D-Bus module brings (Debian 12's pystemd 0.11
# and 13's 0.13), and the runtime of the Cython that built it.
PYSTEMD = {"pystemd", "pystemd.dbusexc", "pystemd.dbuslib", "pystemd.utils"}
CYTHON_RUNTIME = re.compile(r"_cython_[0-9_]+|cython_runtime")

# kvmagent stop NAME (graceful): systemd asked over pystemd, no configuration, no argparse.
STOP = {"kvmagent", "kvmagent.errors", "kvmagent.lifecycle", "kvmagent.names", "kvmagent.paths",
        "kvmagent.cli", "kvmagent.cli.main", "kvmagent.cli.hardstop", "kvmagent.cli.control",
        "kvmagent.config", "kvmagent.config.values",
        "kvmagent.host", "kvmagent.host.leanimport", "kvmagent.host.systemd",
        "kvmagent.render", "kvmagent.render.unitprops"}
# kvmagent stop-post NAME after a run that recorded its own stop: one file read.
STOP_POST_DONE = {"kvmagent", "kvmagent.cli", "kvmagent.cli.main", "kvmagent.lifecycle"}

# Run in a fresh interpreter: PROBE OUT REPO MODE ARGV...  Imports nothing
# beyond what the interpreter has at start (os, sys), before kvmagent.
PROBE = r'''
import os, sys
out, repo, mode, *argv = sys.argv[1:]
sys.path.insert(0, repo)
baseline = set(sys.modules)
main_pid = os.getpid()
real_fork, real_exit = os.fork, os._exit
forks = []

def dump(tag):
    with open(out + "/" + tag, "w") as f:
        f.write("\n".join(sorted(set(sys.modules) - baseline)))

def fork():
    if os.getpid() == main_pid and not forks:
        dump("before-fork")
    forks.append(None)
    return real_fork()

def _exit(code):
    if os.getpid() == main_pid:
        dump("after")
    real_exit(code)

def no_journal(event, args):
    if event == "socket.connect" and args[1] == "/run/systemd/journal/socket":
        raise PermissionError("not the host's journal, in a test")

os.fork, os._exit = fork, _exit
sys.addaudithook(no_journal)
if mode == "systemd":  # as on a host booted with systemd, wherever this runs
    real_isdir = os.path.isdir
    os.path.isdir = lambda p: p == "/run/systemd/system" or real_isdir(p)
from kvmagent.cli.main import main
status = main(argv)
dump("after")
sys.exit(status)
'''


def probe(tmp_path: Path, mode: str, *argv: str, repo: Path = REPO,
          **env: str) -> dict[str, set[str]]:
    """Run `kvmagent ARGV` in a fresh interpreter with its configuration,
    state and runtime directories in TMP_PATH; the modules it imported (not
    the interpreter's own at start), by where they were read."""
    out = tmp_path / "modules"
    out.mkdir(exist_ok=True)
    for f in out.iterdir():
        f.unlink()
    (tmp_path / "probe.py").write_text(PROBE)
    full = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "KVMAGENT_CONFIG_DIR": str(tmp_path / "etc"),
            "KVMAGENT_STATE_DIR": str(tmp_path / "state"),
            "KVMAGENT_RUNTIME_DIR": str(tmp_path / "run"), **env}
    r = subprocess.run([sys.executable, "-I", str(tmp_path / "probe.py"), str(out), str(repo),
                        mode, *argv], env=full, capture_output=True, text=True, timeout=60)
    found = {f.name: set(f.read_text().split()) for f in out.iterdir()}
    assert "after" in found, f"status {r.returncode}\n{r.stdout}\n{r.stderr}"
    found["status"] = {str(r.returncode)}
    return found


def stdlib(module: str) -> bool:
    return module.partition(".")[0] in sys.stdlib_module_names


def own_and_third_party(modules: set[str]) -> set[str]:
    return {m for m in modules if not stdlib(m)}


def guests(tmp_path: Path, *names: str) -> None:
    (tmp_path / "etc" / "guests").mkdir(parents=True, exist_ok=True)
    for name in names:
        (tmp_path / "etc" / "guests" / f"{name}.toml").write_text(
            'cpus = 1\nmemory = "64M"\n')


def test_the_supervisor_imports_only_its_light_modules(tmp_path: Path) -> None:
    guests(tmp_path)
    found = probe(tmp_path, "plain", "run", "nosuch")
    assert found["status"] == {"8"}  # unknown guest: the planner's answer, recorded
    assert own_and_third_party(found["before-fork"]) == RUN_BEFORE_FORK
    assert own_and_third_party(found["after"]) == SUPERVISOR
    assert not found["after"] & NOT_IN_SUPERVISOR, found["after"] & NOT_IN_SUPERVISOR


def test_the_supervisor_imports_nothing_more_later() -> None:
    """What the supervisor's modules import inside their functions (when a
    guest runs, stops, ...) is what it holds anyway, the standard library,
    or runs in a forked child."""
    wrong = []
    for module in sorted(SUPERVISOR - ENTRY):
        for imp in importgraph.imports(module):
            if imp.type_checking or not imp.in_function or stdlib(imp.target):
                continue
            if imp.target not in SUPERVISOR | IN_CHILDREN_ONLY.get(module, set()):
                wrong.append(f"{module} line {imp.line}: {imp.target}")
    assert not wrong, "imports of the long-lived supervisor beyond its set:\n" + "\n".join(wrong)


def test_the_supervisor_holds_no_command_module() -> None:
    """A command's module (it defines a cmd_* function: parser.py runs it)
    brings what the command needs; the supervisor takes shared names from
    the lower modules instead.  Only its own entry (cli, run) is one."""
    commands = {m for m in importgraph.modules()
                if re.search(r"^def cmd_", importgraph.source(m).read_text(), re.M)}
    assert commands & SUPERVISOR == ENTRY & commands


@pytest.mark.parametrize("argv", [["list"], ["list", "--json"]])
def test_list_imports_only_what_a_listing_needs(tmp_path: Path, argv: list[str]) -> None:
    guests(tmp_path, "a", "b")
    # The first listing reads the guests' files; the next ones their cached facts.
    for expected in (LIST_CHANGED, LIST):
        found = probe(tmp_path, "systemd", *argv)
        assert found["status"] == {"0"}
        others = own_and_third_party(found["after"])
        pystemd = {m for m in others if m.startswith("pystemd")}
        cython = {m for m in others if CYTHON_RUNTIME.fullmatch(m)}
        assert others - pystemd - cython == expected
        assert {"pystemd", "pystemd.dbuslib"} <= pystemd <= PYSTEMD


def test_stop_imports_no_configuration(tmp_path: Path) -> None:
    """A graceful stop needs no guest file: its imports are done when it
    asks systemd (no system bus in a build: exit 5; in a booted host,
    kvm@g not running: 0, or 4 for a user systemd refuses), never a
    configuration's answer (6, 8)."""
    guests(tmp_path, "g")
    found = probe(tmp_path, "systemd", "stop", "g")
    assert len(found["status"]) == 1 and found["status"] <= {"0", "4", "5", "7"}, found
    others = own_and_third_party(found["after"])
    pystemd = {m for m in others if m.startswith("pystemd")}
    cython = {m for m in others if CYTHON_RUNTIME.fullmatch(m)}
    assert others - pystemd - cython == STOP
    assert "argparse" not in found["after"]


def test_stop_post_after_a_recorded_stop_imports_next_to_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "g"
    directory.mkdir(parents=True)
    from kvmagent.lifecycle import RECORDED_FILE
    (directory / RECORDED_FILE).write_text("inv1")
    found = probe(tmp_path, "plain", "stop-post", "g", INVOCATION_ID="inv1",
                  RUNTIME_DIRECTORY=str(directory))
    assert found["status"] == {"0"}
    assert own_and_third_party(found["after"]) == STOP_POST_DONE
    # and its standard library: what the interpreter had anyway, nothing more
    assert found["after"] - STOP_POST_DONE <= {"__future__"}, found["after"]


def test_the_rule_catches_a_heavy_import(tmp_path: Path) -> None:
    """The measurement sees an import of the supervisor's, not only the
    modules named above: a copy of kvmagent whose supervisor imports the
    configuration machinery fails the rule."""
    import shutil
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "kvmagent", copy / "kvmagent",
                    ignore=shutil.ignore_patterns("__pycache__"))
    source = copy / "kvmagent" / "unit" / "supervisor.py"
    source.write_text(source.read_text().replace(
        "from kvmagent.errors import",
        "from kvmagent.config import layers  # noqa: F401\nfrom kvmagent.errors import", 1))
    guests(tmp_path)
    found = probe(tmp_path, "plain", "run", "nosuch", repo=copy)
    assert found["status"] == {"8"}
    assert own_and_third_party(found["after"]) - SUPERVISOR == {"kvmagent.config",
                                                                "kvmagent.config.layers"}
