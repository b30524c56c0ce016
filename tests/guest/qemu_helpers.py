"""Small helpers for tests that boot the tiny guest under real QEMU (TCG).

* Console: the client end of QEMU's serial `-chardev socket`; collects
  everything into a buffer and matches markers in text without \\r and
  ANSI escapes.
* Qmp: kvmagent's QMP client (kvmagent.host.qmp), plus poll_events().
* boot(): starts QEMU with the baseline command of guest.md, connects both,
  and kills QEMU on the way out whatever happened.
* on_scratch() and start_paused(): a guest kvmagent loaded, its disks
  pointed at throwaway images and its kernel at the tiny guest's, started
  paused (-S) from kvmagent's own argv, so that no option kvmagent writes
  is invented (tests/qemu).

"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import select
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from kvmagent.config.model import Accel, Format, Guest as GuestConfig, HostConfig
from kvmagent.config.model import Kernel, Media, NicMode
from kvmagent.host.hostcheck import check_host
from kvmagent.host.qemucaps import capabilities
from kvmagent.host.qmp import Qmp as _Qmp
from kvmagent.host.qmp import QmpError
from kvmagent.render.qemu import Sockets, qemu_argv
from tests.guest.build import GuestImage

QEMU = "qemu-system-x86_64"
ANSI_ESCAPE = re.compile(rb"\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[@-_c])")


def clean_console(raw: bytes) -> str:
    """Console bytes as text: no ANSI escapes, no carriage returns."""
    return ANSI_ESCAPE.sub(b"", raw).replace(b"\r", b"").decode(errors="replace")


def connect_unix(path: Path, timeout: float, alive: subprocess.Popen[bytes] | None = None) -> socket.socket:
    """Connect to a unix socket that QEMU is about to create."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if alive is not None and alive.poll() is not None:
                raise RuntimeError(f"QEMU exited with rc {alive.returncode} before {path} appeared")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} did not accept a connection within {timeout} s")
            time.sleep(0.01)


class Console:
    """The guest's serial console (we are the only client)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.raw = b""
        self.pos = 0  # read_until() matches only text after this offset

    @property
    def text(self) -> str:
        return clean_console(self.raw)

    def _pump(self, timeout: float) -> bool:
        """Read what is there (waiting up to timeout); False on EOF."""
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not ready:
            return True
        data = self.sock.recv(65536)
        self.raw += data
        return bool(data)

    def read_until(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait for pattern (a regex) in new console text; raise TimeoutError
        (or EOFError when QEMU closes the console) with the text seen."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            text = self.text
            match = regex.search(text, self.pos)
            if match:
                self.pos = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {regex.pattern!r} on the console within {timeout} s; "
                                   f"console so far:\n{text[-3000:]}")
            if not self._pump(min(remaining, 0.5)):
                raise EOFError(f"console closed before {regex.pattern!r}; console:\n{text[-3000:]}")

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def close(self) -> None:
        self.sock.close()


class Qmp(_Qmp):
    """kvmagent's own QMP client, plus what tests need: poll_events()."""

    def poll_events(self, timeout: float = 0.0) -> None:
        """Collect events that have arrived, waiting up to timeout for one;
        stops quietly when QEMU has closed the connection."""
        with contextlib.suppress(QmpError):
            while True:
                message = self._read(timeout)
                if "event" in message:
                    self.events.append(message)
                timeout = 0.0


def baseline_argv(image: GuestImage, rundir: Path, append: str = "",
                  extra: Sequence[str] = ()) -> list[str]:
    """guest.md's baseline command (plus pvpanic), sockets in rundir."""
    cmdline = " ".join(["console=ttyS0 quiet panic=-1", append]).strip()
    return [QEMU, "-accel", "tcg", "-m", "256", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
            "-qmp", f"unix:{rundir / 'qmp.sock'},server=on,wait=off",
            "-chardev", f"socket,id=ser0,path={rundir / 'ser0.sock'},server=on,wait=off,"
                        f"logfile={rundir / 'ser0.log'}",
            "-serial", "chardev:ser0", "-device", "pvpanic", "-no-reboot", *extra]


@dataclasses.dataclass
class Guest:
    process: subprocess.Popen[bytes]
    console: Console
    qmp: Qmp
    rundir: Path
    started: float  # time.monotonic() just before QEMU was started

    def stderr(self) -> str:
        return (self.rundir / "qemu.stderr").read_text(errors="replace")

    def wait_exit(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def powerdown(self, marker: str = "GUEST-POWEROFF", timeout: float = 30.0,
                  interval: float = 2.0) -> re.Match[str]:
        """Press the power button until marker appears on the console (an
        early press, before acpid listens, is lost)."""
        deadline = time.monotonic() + timeout
        while True:
            self.qmp.execute("system_powerdown")
            try:
                return self.console.read_until(re.escape(marker), min(interval, deadline - time.monotonic()))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise


@contextlib.contextmanager
def boot(image: GuestImage, rundir: Path, append: str = "", extra: Sequence[str] = (),
         netns: str | None = None, timeout: float = 10.0) -> Iterator[Guest]:
    """Start QEMU, connect console and QMP; QEMU is killed on exit."""
    argv = baseline_argv(image, rundir, append, extra)
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]  # execs QEMU: same pid
    rundir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack, open(rundir / "qemu.stderr", "wb") as stderr:
        started = time.monotonic()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        stack.callback(_kill, process)
        try:
            # Connect to the console at once: output without a client is dropped.
            console = Console(connect_unix(rundir / "ser0.sock", timeout, process))
            stack.callback(console.close)
            qmp = Qmp(connect_unix(rundir / "qmp.sock", timeout, process))
            stack.callback(qmp.close)
        except (RuntimeError, TimeoutError, EOFError) as e:
            stderr.flush()
            raise RuntimeError(f"{e}; QEMU stderr:\n{(rundir / 'qemu.stderr').read_text()}") from e
        yield Guest(process, console, qmp, rundir, started)


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def qemu_available() -> bool:
    return any(os.access(Path(d) / QEMU, os.X_OK) for d in os.get_exec_path())


def on_scratch(guest: GuestConfig, image: GuestImage, tmp: Path) -> GuestConfig:
    """GUEST with each disk replaced by a throwaway image in TMP (16 MiB,
    a CD-ROM 1 MiB, qcow2 where the disk says so), its kernel and initrd
    (if it boots one) by the tiny guest's, and VNC on a socket in TMP."""
    disks = []
    for d in guest.disks:
        scratch = tmp / f"{d.node}.img"
        size = (1 if d.media is Media.CDROM else 16) << 20
        if d.format is Format.QCOW2:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(scratch), str(size)],
                           check=True)
        else:
            with open(scratch, "wb") as f:
                f.truncate(size)
        disks.append(dataclasses.replace(d, path=scratch))
    kernel = guest.kernel and Kernel(image.kernel, image.initrd, guest.kernel.cmdline)
    vnc = f"unix:{tmp}/vnc.sock" if guest.display.vnc else None
    return dataclasses.replace(guest, disks=tuple(disks), kernel=kernel,
                               display=dataclasses.replace(guest.display, vnc=vnc))


def start_paused(guest: GuestConfig, host: HostConfig, tmp: Path) -> str:
    """Start GUEST paused (-S) under TCG from kvmagent's argv, sockets in
    TMP; check over QMP that it is in "prelaunch" with all its disks, quit;
    QEMU's stderr.  Only KVM and the bridges may be missing on this host
    (QEMU makes a bridged NIC's tap itself, in a throwaway netns)."""
    facts, problems = check_host(guest, host, kvm_probe=lambda: (False, "not used"),
                                 caps_probe=lambda q: capabilities(q, tmp))
    assert not [p for p in problems if "KVM" not in p.message
                and "no such bridge" not in p.message], problems
    facts = dataclasses.replace(facts, accel=Accel.TCG)
    argv = qemu_argv(guest, host, facts, Sockets.in_dir(tmp))
    argv.insert(1, "-S")
    if any(n.mode is NicMode.BRIDGE for n in guest.nics):
        argv = ["unshare", "--net", "--", *argv]  # the tap stays in a throwaway netns
    with open(tmp / "qemu.stderr", "wb") as stderr:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr)
    try:
        qmp = Qmp(connect_unix(tmp / "qmp.sock", 20, proc))
        status = qmp.execute("query-status")
        assert status["status"] == "prelaunch" and status["running"] is False
        blocks = {b["device"] or b["qdev"]: b for b in qmp.execute("query-block")}
        assert len(blocks) == len(guest.disks)
        qmp.execute("quit")
        assert proc.wait(20) == 0
    finally:
        _kill(proc)
    return (tmp / "qemu.stderr").read_text()
