"""`kvmagent run NAME`: the supervisor, ExecStart= of kvm@NAME.service.

It lives as long as its guest, so it holds only the standard library and
kvmagent's pure modules.  Heavy, once-only work runs in short-lived forked
children (kvmagent.forkcall): opening and enslaving the taps (pyroute2),
creating QEMU's scope and registering the machine (pystemd, pydbus).

Start: load and validate (exit 6 on a bad config), wait a bounded time for
bridges and disks (exit 5), open taps, start QEMU paused (-S) with QMP and
the serial console on socketpairs, move QEMU into kvm-NAME.scope, register
with machined, `cont`, READY=1.  Run: the console goes to the journal;
WATCHDOG=1 only while QMP answers.  SIGUSR1 (`kvmagent stop --force`): QEMU is killed at once, no ACPI.
Stop (SIGTERM): the ACPI power button,
pressed again every few seconds (an early press is lost), until the guest's
stop timeout, extending systemd's stop timeout as it goes; then `quit`, then
SIGKILL.  Exit 0 when the guest powered itself off or was stopped, 1 when
QEMU died otherwise (systemd restarts it)."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

from . import forkcall, names
from .errors import ExitStatus, KvmagentError
from .guests import load_guest, load_host_config
from .hostcheck import check_host, default_kvm_probe
from .model import Guest, HostConfig, NicMode, OnPoweroff
from .paths import Paths
from .qemu import HostFacts, Sockets, qemu_argv
from .qmp import Qmp, QmpError
from .scope import scope_settings
from .sdnotify import Journal, notify

POWERDOWN_INTERVAL = 3.0  # seconds between presses of the ACPI power button
QUIT_GRACE = 5.0  # after `quit`, before SIGKILL
DEVICE_POLL = 0.5

# MESSAGE_IDs of the lifecycle messages (explained in units/kvmagent.catalog).
MSG_STARTING = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b01"
MSG_RUNNING = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b02"
MSG_POWERDOWN = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b03"
MSG_POWEREDOFF = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b04"
MSG_CRASHED = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b05"
MSG_WATCHDOG = "4c2e3a0c6d0b4f0e9b7e3f2a1d5c6b06"


# Terminal escape sequences (busybox ash asks for the cursor position with
# ESC[6n after every prompt) and other control characters make the journal
# store a line as a blob; they are dropped from the journal copy only.
_ESCAPES = re.compile(rb"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-Za-z]|[@-~])")
_CONTROLS = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


def console_text(line: bytes) -> bytes:
    return _CONTROLS.sub(b"", _ESCAPES.sub(b"", line.rstrip(b"\r")))


def systemd_booted() -> bool:
    """sd_booted(3): is this host running systemd as PID 1?"""
    return os.path.isdir("/run/systemd/system")


# -- steps that run in forked children --------------------------------------

def _open_taps(guest: Guest, vhost: bool) -> tuple[dict[int, str], list[int]]:
    """Open and enslave every bridged NIC's tap (one fd per queue, and a
    vhost-net fd per queue where the host has vhost-net).  Value: nic index
    -> QEMU's -netdev tap options naming the fds' positions in the list as
    {N}; the caller fills in the fd numbers."""
    from . import netdev  # pyroute2: only in this child
    fds: list[int] = []
    options: dict[int, str] = {}
    try:
        for nic in guest.nics:
            if nic.mode is not NicMode.BRIDGE:
                continue
            taps = [len(fds) + i for i in range(nic.queues)]
            fds += netdev.open_tap(nic.tap, str(nic.bridge), queues=nic.queues)
            vhosts = []
            for _ in range(nic.queues if vhost else 0):
                vfd = netdev.vhost_fd()
                if vfd is None:
                    break
                vhosts.append(len(fds))
                fds.append(vfd)
            key = "fd" if nic.queues == 1 else "fds"
            opt = f"{key}=" + ":".join(f"{{{i}}}" for i in taps)
            if vhosts:
                opt += f",v{'hostfd' if nic.queues == 1 else 'hostfds'}=" + \
                    ":".join(f"{{{i}}}" for i in vhosts)
            options[nic.index] = opt
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return options, fds


def _make_scope(guest: Guest, host: HostConfig, facts: HostFacts, pid: int,
                taps: list[str]) -> tuple[None, list[int]]:
    from . import machined, systemd  # pystemd, pydbus: only in this child
    systemd.start_scope(names.scope_unit(guest.name), pid, scope_settings(guest, host, facts) +
                        [("PIDs", [pid])])
    ifindices = [socket.if_nametoindex(t) for t in taps]
    machined.register(guest.name, guest.uuid, pid, ifindices)
    return None, []


# -- the supervisor ----------------------------------------------------------

class Supervisor:
    def __init__(self, name: str, paths: Paths) -> None:
        self.name = name
        self.paths = paths
        self.journal = Journal()
        self.unit = names.service_unit(name)
        self.qemu: subprocess.Popen[bytes] | None = None
        self.qmp: Qmp | None = None
        self.console: socket.socket | None = None
        self.console_buffer = b""
        self.stopping = False
        self.guest_poweroff = False
        self.started = 0.0

    def log(self, message: str, priority: int = 6, message_id: str | None = None) -> None:
        fields = {"GUEST": self.name, "SYSLOG_IDENTIFIER": "kvmagent"}
        if message_id:
            fields["MESSAGE_ID"] = message_id
        self.journal.send(message, priority, **fields)

    # -- start --------------------------------------------------------------
    def load(self) -> tuple[Guest, HostConfig]:
        host = load_host_config(self.paths)
        return load_guest(self.paths, self.name, host), host

    def wait_for_host(self, guest: Guest, host: HostConfig) -> HostFacts:
        """Bridges and block devices may appear late at boot: retry the host
        checks until host.device_timeout, then fail naming what is missing."""
        probed: list[tuple[bool, str]] = []

        def probe() -> tuple[bool, str]:  # the KVM probe forks: once is enough
            if not probed:
                probed.append(default_kvm_probe())
            return probed[0]

        deadline = time.monotonic() + host.device_timeout
        while True:
            facts, problems = check_host(guest, host, kvm_probe=probe)
            if not problems:
                for n in facts.notices:
                    self.log(n, 5)
                return facts
            if time.monotonic() >= deadline or any("KVM" in p.message for p in problems):
                for p in problems[1:]:
                    self.log(str(p), 3)
                raise problems[0]
            notify("STATUS=waiting for: " + "; ".join(p.message for p in problems))
            time.sleep(DEVICE_POLL)

    def start(self, stack: ExitStack) -> None:
        # Fork the helpers first, so that their imports (pyroute2 ~250 ms,
        # pystemd and pydbus ~120 ms) overlap with loading the guest.
        net = forkcall.Child(preload=("kvmagent.netdev",))
        stack.callback(net.close)
        sysd = (forkcall.Child(preload=("kvmagent.systemd", "kvmagent.machined"))
                if systemd_booted() else None)
        if sysd is not None:
            stack.callback(sysd.close)
        guest, host = self.load()
        self.guest, self.host = guest, host
        self.log(f"starting guest {guest.name} ({guest.cpus} vCPU, "
                 f"{guest.memory >> 20} MiB)", 6, MSG_STARTING)
        facts = self.wait_for_host(guest, host)

        if any(n.mode is NicMode.BRIDGE for n in guest.nics):
            taps, tap_fds = net.call(_open_taps, guest, facts.vhost_net)
        else:
            net.close()
            taps, tap_fds = {}, []
        qmp_ours, qmp_theirs = socket.socketpair()
        con_ours, con_theirs = socket.socketpair()
        for s in (qmp_ours, con_ours):
            stack.callback(s.close)
        tap_opts = {index: opt.format(*tap_fds) for index, opt in taps.items()}
        sockets = Sockets(qmp=f"fd={qmp_theirs.fileno()}",
                          console=f"fd={con_theirs.fileno()}" if guest.console.serial else None,
                          taps=tap_opts)
        argv = qemu_argv(guest, host, facts, sockets)
        argv.insert(1, "-S")
        passed = [qmp_theirs.fileno(), con_theirs.fileno(), *tap_fds]
        try:
            self.qemu = subprocess.Popen(argv, pass_fds=passed, stdin=subprocess.DEVNULL)
        finally:
            # QEMU holds them now; our copies would keep taps alive after it exits.
            qmp_theirs.close()
            con_theirs.close()
            for fd in tap_fds:
                os.close(fd)
        stack.callback(self._reap)
        self.started = time.monotonic()
        self.qmp = Qmp(qmp_ours, timeout=30)
        self.console = con_ours if guest.console.serial else None

        if sysd is not None:
            bridged = [n.tap for n in guest.nics if n.mode is NicMode.BRIDGE]
            sysd.call(_make_scope, guest, host, facts, self.qemu.pid, bridged)
        else:
            self.log("not booted with systemd: QEMU stays in this process's cgroup, "
                     "no machined registration", 4)
        self.qmp.execute("cont")
        status = self.qmp.execute("query-status")
        if status.get("status") != "running":
            raise KvmagentError(f"QEMU did not start the guest: status {status.get('status')}")
        notify("READY=1", f"STATUS=running, QEMU pid {self.qemu.pid}")
        self.log(f"guest {guest.name} running, QEMU pid {self.qemu.pid}", 6, MSG_RUNNING)

    def _reap(self) -> None:
        if self.qemu is not None and self.qemu.poll() is None:
            self.qemu.kill()
            self.qemu.wait()

    # -- run ------------------------------------------------------------------
    def _console_data(self) -> None:
        assert self.console is not None
        try:
            data = self.console.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.console = None
            return
        self.console_buffer += data
        *lines, self.console_buffer = self.console_buffer.split(b"\n")
        for line in lines:
            self.journal.send(console_text(line), 6, GUEST=self.name,
                              SYSLOG_IDENTIFIER=f"{self.name}-console")

    def _events(self) -> None:
        assert self.qmp is not None
        for event in self.qmp.poll():
            kind, data = event.get("event"), event.get("data", {})
            if kind == "SHUTDOWN" and data.get("guest"):
                self.guest_poweroff = data.get("reason") == "guest-shutdown"
                if self.guest_poweroff:
                    keep = self.guest.on_poweroff is OnPoweroff.KEEP and not self.stopping
                    self.log(f"guest {self.name} powered off" +
                             ("; QEMU kept (on_poweroff = keep)" if keep else ""),
                             6, MSG_POWEREDOFF)
            elif kind == "RESET":
                self.log(f"guest {self.name} reset ({data.get('reason', '?')})", 6)
            elif kind == "GUEST_PANICKED":
                self.log(f"guest {self.name} kernel panic", 3, MSG_CRASHED)

    def _watchdog(self) -> None:
        assert self.qmp is not None
        try:
            self.qmp.execute("query-status", timeout=2.0)
        except QmpError as e:
            self.log(f"QEMU does not answer on QMP ({e.message}); no watchdog ping", 4,
                     MSG_WATCHDOG)
            return
        uptime = int(time.monotonic() - self.started)
        notify("WATCHDOG=1", f"STATUS=running, QEMU pid {self.qemu.pid if self.qemu else '?'}, "
                             f"up {uptime // 86400}d {uptime % 86400 // 3600}h "
                             f"{uptime % 3600 // 60}min")

    def run(self) -> int:
        assert self.qemu is not None and self.qmp is not None
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR1):
            signal.signal(sig, lambda *_: None)
        watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if os.environ.get("WATCHDOG_PID") not in (None, str(os.getpid())):
            watchdog_usec = 0
        ping_every = watchdog_usec / 3e6 if watchdog_usec else None
        next_ping = time.monotonic()
        deadline: float | None = None
        next_press = 0.0
        quit_sent = False
        while self.qemu.poll() is None:
            now = time.monotonic()
            timers = [t for t in (next_ping if ping_every else None,
                                  next_press if self.stopping else None) if t is not None]
            timeout = max(0.0, min(timers) - now) if timers else None
            watch: list[Any] = [wake_r]
            watch += [self.qmp] if not self.qmp.closed else []
            watch += [self.console] if self.console else []
            ready, _, _ = select.select(watch, [], [], min(timeout, 1.0) if timeout is not None else 1.0)
            if wake_r in ready:
                for signum in wake_r.recv(64):
                    if signum == signal.SIGUSR1:  # kvmagent stop --force
                        self.stopping = True
                        self.log(f"stopping QEMU of guest {self.name} without ACPI "
                                 "(stop --force)", 5)
                        self.qemu.kill()
                    elif signum in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                        self.stopping = True
                        deadline = time.monotonic() + self.guest.stop_timeout
                        next_press = time.monotonic()
            if self.console is not None and self.console in ready:
                self._console_data()
            if self.qmp in ready:
                self._events()
            now = time.monotonic()
            if ping_every and now >= next_ping and not self.stopping:
                self._watchdog()
                next_ping = now + ping_every
            if self.stopping and deadline is not None and now >= next_press:
                if now < deadline:
                    left = deadline - now
                    notify(f"EXTEND_TIMEOUT_USEC={int((left + QUIT_GRACE + 10) * 1e6)}",
                           f"STATUS=powering off, {int(left)} s left")
                    self._press_power_button()
                    next_press = now + POWERDOWN_INTERVAL
                elif not quit_sent:
                    self.log(f"guest {self.name} did not power off within "
                             f"{self.guest.stop_timeout:g} s; stopping QEMU", 4)
                    with suppress(KvmagentError, OSError):
                        self.qmp.execute("quit", timeout=2.0)
                    quit_sent = True
                    next_press = now + QUIT_GRACE
                else:
                    self.qemu.kill()
                    next_press = now + 3600
        if self.console is not None:
            while self.console is not None and select.select([self.console], [], [], 0)[0]:
                self._console_data()  # what the guest said last
        with suppress(KvmagentError, OSError, ValueError):
            self._events()
        return self._verdict(self.qemu.wait())

    def _press_power_button(self) -> None:
        assert self.qmp is not None
        try:
            self.qmp.execute("system_powerdown", timeout=2.0)
            self.log(f"ACPI power button pressed for guest {self.name}", 6, MSG_POWERDOWN)
        except QmpError:
            pass  # QEMU is exiting

    def _verdict(self, rc: int) -> int:
        if self.stopping:
            self.log(f"guest {self.name} stopped", 6)
            return ExitStatus.OK
        if rc == 0 and self.guest_poweroff:
            return ExitStatus.OK
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        self.log(f"QEMU of guest {self.name} {how}", 3, MSG_CRASHED)
        return ExitStatus.FAILURE


def run(name: str, paths: Paths) -> int:
    sup = Supervisor(name, paths)
    with ExitStack() as stack:
        try:
            sup.start(stack)
        except KvmagentError as e:
            sup.log(str(e), 3)
            notify(f"STATUS={e.message}")
            return int(e.status)
        return sup.run()
