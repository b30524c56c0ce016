"""The guest's plan: what crosses the fork from the planner child
(kvmagent.unit.startup, which has the configuration machinery) to the
long-lived supervisor and its attach helpers (kvmagent.unit.attach).

Typed records (NamedTuple: pickled as plain tuples, so unpickling imports
this module alone, and typing is loaded anyway), and the placeholders for
the file descriptors in QEMU's command line: only the supervisor knows the
fd numbers, and fills them in when it starts QEMU."""

from __future__ import annotations

from typing import Any, NamedTuple

QMP_FD = "\0qmp\0"
CONSOLE_FD = "\0console\0"


def tap_token(index: int) -> str:
    return f"\0tap{index}\0"


def disk_token(index: int, mode: str) -> str:
    return f"\0disk{index}{mode}\0"


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
    disk gets an O_RDWR and an O_RDONLY fd: QEMU picks by its open mode)."""
    path: str
    readonly: bool
    tokens: tuple[str, ...]


class QemuUser(NamedTuple):
    """The unprivileged user QEMU runs as."""
    uid: int
    gid: int
    groups: tuple[int, ...]


class Plan(NamedTuple):
    name: str
    uuid: str
    cpus: int
    memory_mib: int
    stop_timeout: float  # seconds the guest has to power off after the first press
    keep: bool  # on_poweroff = "keep": the unit stays up when the guest powers off
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
