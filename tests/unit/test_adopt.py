"""Taking over a running guest (kvmagent.unit.adopt): the running record,
which process is this guest's QEMU, a QEMU watched through a pidfd, the fds
systemd gives back, and when kvmagent-orphan@ acts (kvmagent.unit.orphan)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from kvmagent.errors import KvmagentError
from kvmagent.host.sdnotify import listen_fds
from kvmagent.paths import Paths
from kvmagent.render.plan import Running
from kvmagent.unit import adopt
from kvmagent.unit.orphan import orphaned

RUNNING = Running("g", "8a1f1c43-2b6c-4a4e-9d3e-111111111111", 1234, 1.7e9, 90.0, False, True,
                  10, 1.0, "^]", ["kvm-g-0"], "0.1.0")
CMDLINE = ["/usr/bin/qemu-system-x86_64", "-S", "-name", "guest=g,debug-threads=on",
           "-uuid", RUNNING.uuid, "-m", "256"]
CGROUP = "0::/machine.slice/kvm-g.scope\n"


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths(tmp_path / "etc", tmp_path / "state", tmp_path / "run")
    p.guest_runtime("g").mkdir(parents=True)
    return p


def test_the_running_record_round_trips(paths: Paths) -> None:
    adopt.write_running(paths, RUNNING)
    assert adopt.read_running(paths, "g") == RUNNING
    assert adopt.read_running(paths, "other") is None  # a first start


@pytest.mark.parametrize("change, why", [
    ({"qemu_pid": "1234"}, "qemu_pid: '1234' is not int"),
    ({"keep": 1}, "keep: 1 is not bool"),
    ({"since": True}, "since: True is not float"),
    ({"taps": ["a", 1]}, "taps[1]: 1 is not str"),
    ({"uuid": None}, "uuid: None is not str"),
])
def test_a_damaged_record_is_refused_naming_the_field(paths: Paths, change: dict[str, object],
                                                      why: str) -> None:
    paths.running_record("g").write_text(json.dumps({**RUNNING._asdict(), **change}))
    with pytest.raises(KvmagentError) as e:
        adopt.read_running(paths, "g")
    assert e.value.message.endswith(f"unreadable running record: {why}")


def test_a_record_of_another_guest_is_refused(paths: Paths) -> None:
    paths.running_record("g").write_text(RUNNING._replace(name="h").to_json())
    with pytest.raises(KvmagentError, match="the running record of guest h, not g"):
        adopt.read_running(paths, "g")


@pytest.mark.parametrize("cmdline, cgroup, problem", [
    (CMDLINE, CGROUP, None),
    (CMDLINE, "0::/machine.slice/kvm-gg.scope\n", "it is not in kvm-g.scope"),
    (CMDLINE, "0::/system.slice/cron.service\n", "it is not in kvm-g.scope"),
    ([a.replace("111111111111", "222222222222") for a in CMDLINE], CGROUP,
     "its -uuid is '8a1f1c43-2b6c-4a4e-9d3e-222222222222', not " + RUNNING.uuid),
    ([a.replace("guest=g,", "guest=h,") for a in CMDLINE], CGROUP,
     "its -name is 'guest=h,debug-threads=on', not guest=g"),
    (["/bin/sleep", "1000"], CGROUP, f"its -uuid is None, not {RUNNING.uuid}"),
])
def test_only_this_guests_qemu_is_taken_over(cmdline: list[str], cgroup: str,
                                             problem: str | None) -> None:
    assert adopt.identity_problem(RUNNING, cmdline, cgroup) == problem


def test_the_qemu_runs_as_the_user_it_was_started_as() -> None:
    running = RUNNING._replace(qemu_uid=64055)
    assert adopt.identity_problem(running, CMDLINE, CGROUP, 64055) is None
    assert adopt.identity_problem(running, CMDLINE, CGROUP, 0) == "it runs as uid 0, not 64055"
    assert adopt.identity_problem(RUNNING, CMDLINE, CGROUP, 0) is None  # not recorded


def test_a_record_of_an_older_kvmagent_is_read(paths: Paths) -> None:
    """A reload reads what the supervisor it replaces wrote: fields added
    since (with a default) may be missing."""
    older = {k: v for k, v in RUNNING._asdict().items()
             if k not in ("takeovers", "qemu_uid", "reboot_stops")}
    paths.running_record("g").write_text(json.dumps(older))
    assert adopt.read_running(paths, "g") == RUNNING._replace(takeovers=0, qemu_uid=-1)


LOCK_CHILD = """
import os, sys
from pathlib import Path
from kvmagent.errors import KvmagentError
from kvmagent.paths import Paths
from kvmagent.unit import adopt
p = Paths(*(Path(a) for a in sys.argv[1:4]))
try:
    fd = adopt.lock(p, "g")
except KvmagentError as e:
    print("refused:", e.message, "|", e.hint)
else:
    print("locked", fd, os.get_inheritable(fd))
"""


def _lock_in_child(paths: Paths, env: dict[str, str] | None = None,
                   pass_fds: tuple[int, ...] = ()) -> str:
    import sys
    return subprocess.run(
        [sys.executable, "-c", LOCK_CHILD, str(paths.config_dir), str(paths.state_dir),
         str(paths.runtime_dir)], capture_output=True, text=True, check=True,
        env={**os.environ, **(env or {})}, pass_fds=pass_fds,
        cwd=Path(__file__).parents[2]).stdout.strip()


def test_one_supervisor_per_guest(paths: Paths) -> None:
    """A second supervisor (another process) is refused, naming the first;
    a reload (execve with the fd in the environment) keeps the lock."""
    paths.supervisor_pid("g").write_text("4321 5678\n")
    assert _lock_in_child(paths).startswith("locked ")
    fd = adopt.lock(paths, "g")
    try:
        assert fd >= adopt.LOCK_FD_MIN and not os.get_inheritable(fd)
        assert _lock_in_child(paths) == (
            "refused: guest g already has a supervisor (pid 4321) | it runs as "
            "kvm@g.service or kvm-oneoff@g.service (systemctl status); a guest has one supervisor")
        env: dict[str, str] = {}
        adopt.pass_lock(fd, env)
        assert os.get_inheritable(fd) and env == {adopt.LOCK_ENV: str(fd)}
        # what the reloaded code does with it (here in a child, which cannot
        # hold this process's lock: it is handed the fd, and finds it is the lock's)
        assert _lock_in_child(paths, env, (fd,)) == f"locked {fd} False"
    finally:
        os.close(fd)
    assert _lock_in_child(paths).startswith("locked ")  # the kernel released it


def test_a_qemu_that_is_gone_means_a_normal_start() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    assert adopt.AdoptedQemu.find(RUNNING._replace(qemu_pid=child.pid)) is None


def test_a_process_outside_the_guests_scope_is_not_taken_over() -> None:
    """A pid that is reused by another process: not this guest's QEMU, and
    not in its scope — a normal start, not an error."""
    with subprocess.Popen(["sleep", "30"]) as child:
        try:
            assert adopt.AdoptedQemu.find(RUNNING._replace(qemu_pid=child.pid)) is None
        finally:
            child.kill()


def test_an_adopted_process_is_watched_and_killed_through_its_pidfd() -> None:
    with subprocess.Popen(["sleep", "30"]) as child:
        qemu = adopt.AdoptedQemu(child.pid)
        assert qemu.poll() is None
        qemu.kill()
        child.wait()  # reaped by its parent, as systemd reaps an adopted QEMU
        assert qemu.wait(5.0) == 0 and qemu.poll() == 0
        qemu.close()


def test_fds_given_back_by_systemd_are_found_by_name() -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        # where systemd puts them: from fd 3 on
        os.dup2(a.fileno(), 3)
        os.dup2(c.fileno(), 4)
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2",
               "LISTEN_FDNAMES": "qmp:console"}
        assert listen_fds(env) == {"qmp": 3, "console": 4}
        assert env == {}  # consumed: no child takes them for its own
        assert not os.get_inheritable(3)
        assert listen_fds({"LISTEN_PID": "1", "LISTEN_FDS": "2"}) == {}  # not ours
    finally:
        for s in (a, b, c, d):
            s.close()


@pytest.mark.parametrize("services, scope, acts", [
    (["failed", None], "active", True),  # past the start limit
    (["inactive", None], "active", True),
    (["activating", None], "active", False),  # 257: before an automatic restart
    (["active", None], "active", False),
    ([None, "active"], "active", False),  # a one-off guest's supervisor runs
    (["failed", None], None, False),  # QEMU is gone already
    (["failed", None], "inactive", False),
])
def test_the_orphan_unit_acts_only_without_a_supervisor(services: list[str | None],
                                                        scope: str | None, acts: bool) -> None:
    assert orphaned(services, scope) is acts


def test_notify_and_store_fd_reach_a_notify_socket(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """What systemd's $NOTIFY_SOCKET receives: a path or an abstract ("@")
    address; store_fd's datagram carries the fd itself (SCM_RIGHTS)."""
    import array

    from kvmagent.host import sdnotify

    for address in (str(tmp_path / "notify"), f"@kvmagent-test-{os.getpid()}"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind(address if address[0] != "@" else "\0" + address[1:])
            monkeypatch.setenv("NOTIFY_SOCKET", address)
            assert sdnotify.notify("READY=1", "STATUS=up")
            assert server.recv(100) == b"READY=1\nSTATUS=up"
            r, w = os.pipe()
            assert sdnotify.store_fd(w, "qmp")
            os.close(w)
            fds = array.array("i")
            data, ancillary, _, _ = server.recvmsg(100, socket.CMSG_SPACE(fds.itemsize))
            assert data == b"FDSTORE=1\nFDNAME=qmp"
            fds.frombytes(ancillary[0][2])
            os.write(fds[0], b"x")  # the same pipe, received as a new fd
            assert os.read(r, 1) == b"x"
            os.close(fds[0])
            os.close(r)
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sdnotify.notify("READY=1") and not sdnotify.store_fd(0, "x")
