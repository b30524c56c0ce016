"""The supervisor (`kvmagent run NAME`) end to end on this machine, without
systemd: in a fresh network namespace with a bridge, the tiny real guest
(QEMU TCG) gets its tap from netlink, pings the bridge, and powers off over
ACPI on SIGTERM.  Under systemd (scope, machined, sd_notify, watchdog) the
same code runs in tests/system."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmagent.host.bridge import ensure_bridge
from kvmagent.errors import ExitStatus

pytestmark = [pytest.mark.net, pytest.mark.qemu]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image(guest_image):  # type: ignore[no-untyped-def]
    return guest_image


def write_guest(tmp: Path, image, tables: str = "", cmdline: str = "", top: str = "") -> Path:
    etc = tmp / "etc"
    (etc / "guests").mkdir(parents=True, exist_ok=True)
    # QEMU as an unprivileged user that every system has (the package's
    # kvmagent-qemu is made in the test hosts, not on this machine)
    (etc / "kvmagent.toml").write_text('device_timeout = "1s"\nqemu_user = "nobody"\n')
    (etc / "guests" / "demo.toml").write_text(f"""{top}
accel = "tcg"
memory = "256M"
[kernel]
image = "{image.kernel}"
initrd = "{image.initrd}"
cmdline = "console=ttyS0 quiet panic=-1 {cmdline}"
[stop]
timeout = "30s"
{tables}
""")
    return etc


def start(tmp: Path, etc: Path) -> subprocess.Popen[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO),
           "KVMAGENT_CONFIG_DIR": str(etc), "KVMAGENT_RUNTIME_DIR": str(tmp / "run"),
           "KVMAGENT_STATE_DIR": str(tmp / "state")}
    # a session of its own: a failing test kills the supervisor *and* its QEMU
    return subprocess.Popen([sys.executable, "-m", "kvmagent", "run", "demo"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@contextlib.contextmanager
def supervising(tmp: Path, etc: Path) -> Iterator[subprocess.Popen[str]]:
    """`kvmagent run demo`, killed on the way out if the test left it running."""
    proc = start(tmp, etc)
    try:
        yield proc
    finally:
        # Without systemd nothing else stops QEMU when its supervisor is
        # killed (under systemd its scope is bound to the service).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float, seen: list[str]) -> None:
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            seen.append(line)
            if marker in line:
                return
        elif proc.poll() is not None:
            break
        else:
            time.sleep(0.05)
    raise AssertionError(f"no {marker!r} within {timeout} s:\n{''.join(seen)}")


def links() -> dict[str, str | None]:
    """Interfaces of this thread's netns (/sys/class/net shows the host's)
    -> name of their master."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        byindex = {l["index"]: l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
        return {l.get_attr("IFLA_IFNAME"): byindex.get(l.get_attr("IFLA_MASTER"))
                for l in ipr.get_links()}


def qemu_children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_bridged_guest_pings_and_powers_off_on_sigterm(netns, image, tmp_path):
    ensure_bridge("br-kvm", address="10.77.0.1/24")
    etc = write_guest(tmp_path, image, "[[nic]]\n",
                      "guest.ip=10.77.0.2/24 guest.ping=10.77.0.1")
    seen: list[str] = []
    with supervising(tmp_path, etc) as proc:
        read_until(proc, "GUEST-PING-OK 10.77.0.1", 90, seen)
        assert links()["kvm-demo-0"] == "br-kvm"
        proc.send_signal(signal.SIGTERM)
        read_until(proc, "GUEST-POWEROFF", 40, seen)
        assert proc.wait(20) == 0
    seen += proc.stdout.readlines() if proc.stdout else []
    text = "".join(seen)
    assert "ACPI power button pressed" in text and "guest demo stopped" in text
    assert "kvm-demo-0" not in links(), "the tap outlived QEMU"


def test_multiqueue_tap(netns, image, tmp_path):
    ensure_bridge("br-kvm", address="10.77.0.1/24")
    etc = write_guest(tmp_path, image, "[[nic]]\nqueues = 2\n",
                      "guest.ip=10.77.0.2/24 guest.ping=10.77.0.1", top="cpus = 2")
    seen: list[str] = []
    with supervising(tmp_path, etc) as proc:
        read_until(proc, "GUEST-PING-OK 10.77.0.1", 90, seen)
        (qemu,) = qemu_children(proc.pid)
        cmdline = open(f"/proc/{qemu}/cmdline").read().split("\0")
        assert any(a.startswith("tap,id=net0,fds=") and a.count(":") == 1 for a in cmdline)
        assert "mq=on,vectors=6" in " ".join(cmdline)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 0


def test_qemu_killed_is_a_failure(netns, image, tmp_path):
    etc = write_guest(tmp_path, image)
    seen: list[str] = []
    with supervising(tmp_path, etc) as proc:
        read_until(proc, "GUEST-READY", 90, seen)
        (qemu,) = qemu_children(proc.pid)
        os.kill(qemu, signal.SIGKILL)
        assert proc.wait(20) == ExitStatus.FAILURE
    assert "was killed by signal 9" in proc.stdout.read()  # type: ignore[union-attr]


def test_bad_config_starts_nothing(netns, image, tmp_path):
    etc = write_guest(tmp_path, image, "[[nic]]\n", top='cpus = "two"')
    proc = start(tmp_path, etc)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == ExitStatus.CONFIG
    assert 'demo.toml: cpus = "two": expected an integer' in out
    assert list(links()) == ["lo"]


def test_missing_bridge_fails_after_waiting(netns, image, tmp_path):
    etc = write_guest(tmp_path, image, '[[nic]]\nbridge = "br-missing"\n')
    t0 = time.monotonic()
    proc = start(tmp_path, etc)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == ExitStatus.HOST_NOT_READY
    assert time.monotonic() - t0 >= 1.0  # device_timeout = "1s"
    assert 'nic[0].bridge = "br-missing": no such bridge' in out
    assert "kvmagent bridge ensure br-missing" in out
    assert list(links()) == ["lo"]


def test_stop_force_while_waiting_for_the_bridge(netns, image, tmp_path):
    """`kvmagent stop --force` (SIGUSR1) ends a start at once, successfully
    (systemd does not restart the guest), even while it waits for devices."""
    etc = write_guest(tmp_path, image, '[[nic]]\nbridge = "br-late"\n')
    (etc / "kvmagent.toml").write_text('device_timeout = "60s"\nqemu_user = "nobody"\n')
    seen: list[str] = []
    proc = start(tmp_path, etc)
    try:
        read_until(proc, "waits up to 60 s for", 30, seen)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(10) == ExitStatus.OK
        assert time.monotonic() - t0 < 5
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "stopped while starting (stop --force)" in "".join(seen) + proc.stdout.read()  # type: ignore[union-attr]
    assert list(links()) == ["lo"]
    assert not (tmp_path / "run" / "demo" / "supervisor.pid").exists()


def console(tmp: Path, etc: Path, text: str, timeout: float = 3) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO),
           "KVMAGENT_CONFIG_DIR": str(etc), "KVMAGENT_RUNTIME_DIR": str(tmp / "run")}
    return subprocess.run([sys.executable, "-m", "kvmagent", "console", "demo", "--timeout",
                           str(timeout)], input=text, env=env, text=True, capture_output=True,
                          timeout=60)


def pty_session(tmp_path: Path, etc: Path, leave: bytes, n: int) -> None:
    """`kvmagent console demo` on a terminal: type a command, see its answer,
    leave with LEAVE; the terminal's settings are as before."""
    import pty
    import termios
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update({"PYTHONPATH": str(REPO), "KVMAGENT_CONFIG_DIR": str(etc),
                           "KVMAGENT_RUNTIME_DIR": str(tmp_path / "run")})
        os.execv(sys.executable, [sys.executable, "-m", "kvmagent", "console", "demo"])
    before = termios.tcgetattr(fd)
    out = b""
    deadline = time.monotonic() + 20

    def read_pty() -> bytes:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        return os.read(fd, 4096) if ready else b""

    while b"leave with Ctrl-] or Ctrl-Q" not in out and time.monotonic() < deadline:
        out += read_pty()
    os.write(fd, b"echo PTY-$((%d+1))\r" % n)
    answer = b"PTY-%d\r" % (n + 1)
    while answer not in out.replace(b"PTY-$((", b"") and time.monotonic() < deadline:
        out += read_pty()
    assert answer in out, out
    os.write(fd, leave)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert termios.tcgetattr(fd) == before, "the terminal was not restored"
    os.close(fd)


def test_console_viewers(netns, image, tmp_path):
    import socket as socketlib
    etc = write_guest(tmp_path, image)
    seen: list[str] = []
    with supervising(tmp_path, etc) as proc:
        read_until(proc, "Enter 'help'", 90, seen)
        sock_path = tmp_path / "run" / "demo" / "console.sock"
        assert oct(os.stat(sock_path).st_mode & 0o777) == "0o600"
        # scripted, through a pipe; the journal copy (stderr here) gets it too
        r = console(tmp_path, etc, "echo ANSWER-$((6*7))\n")
        assert r.returncode == 0 and "ANSWER-42" in r.stdout, (r.stdout, r.stderr)
        read_until(proc, "ANSWER-42", 10, seen)
        # two viewers at once: both see what one of them typed
        a, b = (socketlib.socket(socketlib.AF_UNIX) for _ in range(2))
        for v in (a, b):
            v.connect(str(sock_path))
            v.settimeout(10)
        time.sleep(0.2)
        a.sendall(b"echo BOTH-$((2+3))\n")
        for v in (a, b):
            got = b""
            while b"BOTH-5" not in got.replace(b"BOTH-$((2+3))", b""):
                chunk = v.recv(4096)  # each within 10 s, or TimeoutError
                assert chunk, f"the console closed before the answer: {got!r}"
                got += chunk
            v.close()
        # interactively, in a pty: Ctrl-] and Ctrl-Q (the seed's socat key)
        # leave, and the terminal is restored
        for n, key in enumerate((b"\x1d", b"\x11")):
            try:
                pty_session(tmp_path, etc, key, n)
            except AssertionError:
                with contextlib.suppress(AssertionError):
                    read_until(proc, f"PTY-{n + 1}", 1, seen)
                print("supervisor's output (the journal copy):\n" + "".join(seen[-40:]))
                raise
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 0
    assert not (tmp_path / "run" / "demo" / "console.sock").exists()
    r = console(tmp_path, etc, "")
    assert r.returncode == 7 and "guest demo is not running" in r.stderr
