"""The guest's plan: what crosses the fork from the planner child
(kvmagent.unit.startup, which has the configuration machinery) to the
long-lived supervisor and its attach helpers (kvmagent.unit.attach).

Typed records (NamedTuple: pickled as plain tuples, so unpickling imports
this module and its reader of JSON records alone, and typing is loaded
anyway), and the placeholders for the file descriptors in QEMU's command
line: only the supervisor knows the fd numbers, and fills them in when it
starts QEMU."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from kvmagent.render import records

QMP_FD = "\0qmp\0"
CONSOLE_FD = "\0console\0"


def tap_token(index: int) -> str:
    return f"\0tap{index}\0"


def disk_token(index: int, mode: str) -> str:
    return f"\0disk{index}{mode}\0"


def backing_token(index: int, depth: int) -> str:
    """A read-only fd of backing file DEPTH (0: the nearest) of disk INDEX."""
    return f"\0disk{index}b{depth}ro\0"


def fill_in(arg: str, values: dict[str, str]) -> str:
    for token, value in values.items():
        arg = arg.replace(token, value)
    return arg


class Tap(NamedTuple):
    """A bridged NIC's tap."""
    nic: int  # the NIC's index in the guest
    name: str
    bridge: str
    queues: int


class Disk(NamedTuple):
    """A disk the supervisor opens for QEMU: one fd per token (a read-write
    disk gets an O_RDWR and an O_RDONLY fd: QEMU picks by its open mode).
    A qcow2 image's backing files are Disks too, read-only, one token each."""
    path: str
    readonly: bool
    tokens: tuple[str, ...]
    # opened with O_DIRECT (cache none or directsync): QEMU 9.1 and later
    # (Debian 13) take an fd from a set only if its O_DIRECT flag matches
    direct: bool = False


class QemuUser(NamedTuple):
    """The unprivileged user QEMU runs as."""
    uid: int
    gid: int
    groups: tuple[int, ...]


class Incoming(NamedTuple):
    """The request of `kvmagent migrate-incoming` (a file in the guest's
    runtime directory, kvmagent.paths.Paths.incoming_request): start QEMU
    waiting for a live migration from SOURCE, with the source QEMU's exact
    machine type and CPU model; BOOTED, when the source's record had it, the
    wall clock of the guest's boot (its uptime goes on here)."""
    machine: str
    cpu: str
    source: str  # the host the guest comes from, as the command names it
    booted: float | None = None

    def to_json(self) -> str:
        return json.dumps(self._asdict())

    @classmethod
    def from_json(cls, text: str) -> Incoming:
        """ValueError naming the field when TEXT is not such a record."""
        return records.read(cls, json.loads(text))


class Plan(NamedTuple):
    name: str
    uuid: str
    cpus: int
    memory_mib: int
    stop_timeout: float  # seconds the guest has to power off after the first press
    keep: bool  # on_poweroff = "keep": the unit stays up when the guest powers off
    reboot_stops: bool  # on_reboot = "stop": a guest reboot is a poweroff
    serial: bool  # the serial console goes to the journal
    console_burst: int  # kvmagent.unit.consolelog's rate limit
    console_interval: float
    escape: str  # `kvmagent console`'s escape key
    argv: list[str]  # QEMU's command line, with -S and the placeholders above
    vhost: bool  # /dev/vhost-net is usable
    disks: list[Disk]
    qemu_user: QemuUser | None  # None: QEMU runs as root
    taps: list[Tap]
    scope_unit: str  # kvm-NAME.scope
    scope: list[tuple[str, Any]]  # its settings (kvmagent.render.scope)
    # QEMU waits for a live migration (argv has -incoming defer), not booting
    incoming: Incoming | None = None


class Running(NamedTuple):
    """What a supervisor leaves in the runtime directory for the one that
    takes its guest over (kvmagent.unit.adopt): the QEMU it runs and the
    part of the plan it started with (a changed configuration applies at
    the guest's next start, not to a QEMU that is already running)."""
    name: str
    uuid: str
    qemu_pid: int
    since: float  # when QEMU was started, CLOCK_REALTIME
    stop_timeout: float
    keep: bool
    serial: bool
    console_burst: int
    console_interval: float
    escape: str
    taps: list[str]
    version: str  # the kvmagent that started QEMU
    takeovers: int = 0  # supervisors that took QEMU over since (deaths and reloads)
    qemu_uid: int = -1  # the user QEMU runs as (-1: not recorded, kvmagent 0.1.0)
    reboot_stops: bool = False  # on_reboot = "stop" (not recorded before it existed)

    @classmethod
    def from_plan(cls, plan: Plan, qemu_pid: int, since: float, version: str) -> Running:
        return cls(plan.name, plan.uuid, qemu_pid, since, plan.stop_timeout, plan.keep,
                   plan.serial, plan.console_burst, plan.console_interval, plan.escape,
                   [t.name for t in plan.taps], version, 0,
                   plan.qemu_user.uid if plan.qemu_user else 0, plan.reboot_stops)

    def to_json(self) -> str:
        return json.dumps(self._asdict())

    @classmethod
    def from_json(cls, text: str) -> Running:
        """ValueError naming the field when TEXT is not such a record."""
        return records.read(cls, json.loads(text))
