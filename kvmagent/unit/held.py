"""What a supervisor holds for its guest: QEMU, its QMP and serial console,
the console's viewers, the control channel, the sockets in systemd's fd
store, the one-supervisor lock, the stop policy and the event record.
kvmagent.unit.supervisor starts and runs a guest on it;
kvmagent.unit.takeover (a guest taken over, the control channel, reload)
and kvmagent.unit.migration (live migration) act on the same state, so
they take a Held and need not import the supervisor.  Standard library and
light modules only: this runs in the long-lived supervisor."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

from kvmagent.host.qmp import Qmp
from kvmagent.host.sdnotify import Journal
from kvmagent.paths import Paths
from kvmagent.render.plan import Running
from kvmagent.unit.adopt import AdoptedQemu
from kvmagent.unit.consolelog import ConsoleLog
from kvmagent.unit.recorder import EventRecorder
from kvmagent.unit.stoppolicy import StopPolicy
from kvmagent.unit.viewers import ConsoleHub

# Messages (console lines mostly) kept while journald does not take them.
JOURNAL_BACKLOG = 4096


class Held:
    def __init__(self, name: str, paths: Paths, unit: str) -> None:
        self.name = name
        self.paths = paths
        # never waits for journald; names UNIT (kvm@NAME.service, or a one-off
        # guest's), as a start that fails is said just before the exit
        self.journal = Journal(backlog=JOURNAL_BACKLOG, unit=unit)
        self.qemu: subprocess.Popen[bytes] | AdoptedQemu | None = None
        self.qmp: Qmp | None = None
        self.console: socket.socket | None = None
        self.console_log = ConsoleLog()
        self.hub: ConsoleHub | None = None
        self.stop = StopPolicy(stop_timeout=0.0, keep=False)  # the plan's, once made
        self.started = 0.0
        self.since = time.time()  # when this supervisor started or took the guest over
        self.running: Running | None = None  # what the next supervisor needs
        self.channel: socket.socket | None = None  # kvmagent.unit.channel
        self.kept: dict[str, socket.socket] = {}  # in systemd's fd store, by name
        self.lock = -1  # kvmagent.unit.adopt.lock: one supervisor per guest
        self.thaw_at: float | None = None  # paused for a snapshot until (monotonic)
        self.abandoned = False  # failed with QEMU's fds kept: QEMU is left running
        self.migrated_to: str | None = None  # kvmagent migrate moved the guest there
        self.held: str | None = None  # paused, its state sent there: the unit's status
        self.paused_at: float | None = None  # QEMU's last STOP event (wall clock)
        self.resumed_at: float | None = None  # an arrival: when the guest ran here (wall clock)
        self.incoming: str | None = None  # a live migration's destination: from where
        self.booted: float | None = None  # ... and when the guest booted there
        self.mirrors: list[str] = []  # migrate --copy-storage: the drives being copied away
        self.serving = False  # migrate --copy-storage: the destination's NBD server runs
        self.record = EventRecorder(name, paths, lambda text: self.log(text, 4))

    def log(self, message: str, priority: int = 6, message_id: str | None = None) -> None:
        fields = {"GUEST": self.name, "SYSLOG_IDENTIFIER": "kvmagent"}
        if message_id:
            fields["MESSAGE_ID"] = message_id
        self.journal.send(message, priority, **fields)

    def catch_signals(self) -> None:
        """Signals wake the main loop through a socket (signal.set_wakeup_fd)."""
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno())
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR1):
            signal.signal(sig, lambda *_: None)

    def reap(self) -> None:
        if self.abandoned:  # for the next supervisor to take over
            return
        if self.qemu is not None and self.qemu.poll() is None:
            self.qemu.kill()
            self.qemu.wait()
