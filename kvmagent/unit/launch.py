"""Launching a guest's QEMU for the supervisor (kvmagent.unit.supervisor):
its disks opened here (QEMU may run as a user who could not open them),
QMP and the serial console on socketpairs, the taps and disks passed as
file descriptors, QEMU started paused (-S) as its plan says; and the pid
file that `kvmagent stop --force` reads.  Standard library and light
modules only: this runs in the long-lived supervisor."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from contextlib import suppress
from typing import Any, NamedTuple

from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.paths import Paths
from kvmagent.render.plan import CONSOLE_FD, QMP_FD, Disk, Plan, fill_in, tap_token


class Launched(NamedTuple):
    """A QEMU just started (paused), and the supervisor's ends of its QMP
    and serial console sockets (the caller closes them)."""
    qemu: subprocess.Popen[bytes]
    qmp: socket.socket
    console: socket.socket


def open_disks(disks: list[Disk]) -> tuple[dict[str, str], list[int]]:
    """Open the guest's disks for QEMU (it may run as a user who could not):
    token -> fd number, and the fds (O_CLOEXEC; Popen's pass_fds passes them)."""
    fill: dict[str, str] = {}
    fds: list[int] = []
    try:
        for path, _, tokens, direct in disks:
            for token in tokens:
                mode = os.O_RDONLY if token.endswith("ro\0") else os.O_RDWR
                mode |= os.O_DIRECT if direct else 0
                try:
                    fds.append(os.open(path, mode | os.O_CLOEXEC))
                except OSError as e:
                    hint = None
                    if e.errno == errno.EROFS:  # kvm@.service's ProtectSystem=strict
                        hint = ("kvmagent-generator makes a guest's writable image files "
                                "writable in its kvm@NAME.service: run systemctl "
                                "daemon-reload after adding or moving a disk, and start "
                                "the guest again")
                    raise KvmagentError(f"cannot open disk {path}: {e.strerror}", hint,
                                        ExitStatus.HOST_NOT_READY) from None
                fill[token] = str(fds[-1])
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fill, fds


def write_pid_file(paths: Paths, name: str, qemu: int | None = None) -> None:
    """For `kvmagent stop --force` (kvmagent.cli.hardstop, which reads it): at
    start, and again with QEMU's pid once QEMU runs (the file is replaced
    atomically): "SUPERVISOR [QEMU]"."""
    path = paths.supervisor_pid(name)
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{os.getpid()}" + (f" {qemu}" if qemu else "") + "\n")
    os.replace(tmp, path)


def read_pid_file(paths: Paths, name: str) -> int | None:
    """The supervisor's pid in the file (a dead one's, when taking over)."""
    try:
        return int(paths.supervisor_pid(name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def remove_pid_file(paths: Paths, name: str) -> None:
    with suppress(FileNotFoundError):
        paths.supervisor_pid(name).unlink()


def systemd_booted() -> bool:
    """sd_booted(3): is this host running systemd as PID 1?"""
    return os.path.isdir("/run/systemd/system")


def launch(plan: Plan, taps: dict[int, str], tap_fds: list[int]) -> Launched:
    """Start QEMU (paused) with the plan's argv, its fds filled in: QMP and
    the console on socketpairs, TAPS (tap index -> option with {} for the
    fds in TAP_FDS) and the disks.  TAP_FDS are closed here, whatever happens:
    QEMU holds them now, and our copies would keep taps alive after it exits;
    without QEMU (a disk that cannot be opened), closing them is what removes
    the taps at once."""
    theirs: list[socket.socket] = []
    ours: list[socket.socket] = []
    disk_fds: list[int] = []
    try:
        qmp_ours, qmp_theirs = socket.socketpair()
        ours.append(qmp_ours)
        theirs.append(qmp_theirs)
        con_ours, con_theirs = socket.socketpair()
        ours.append(con_ours)
        theirs.append(con_theirs)
        fill = {QMP_FD: str(qmp_theirs.fileno()), CONSOLE_FD: str(con_theirs.fileno())}
        fill |= {tap_token(index): opt.format(*tap_fds) for index, opt in taps.items()}
        disk_fill, disk_fds = open_disks(plan.disks)
        argv = [fill_in(arg, fill | disk_fill) for arg in plan.argv]
        passed = [qmp_theirs.fileno(), con_theirs.fileno(), *tap_fds, *disk_fds]
        user: dict[str, Any] = {}
        if plan.qemu_user:  # an unprivileged user (kvmagent.host.qemuuser)
            uid, gid, groups = plan.qemu_user
            user = {"user": uid, "group": gid, "extra_groups": groups}
        qemu = subprocess.Popen(argv, pass_fds=passed, stdin=subprocess.DEVNULL, **user)
    except BaseException:
        for sock in ours:
            sock.close()
        raise
    finally:
        for sock in theirs:
            sock.close()
        for fd in tap_fds + disk_fds:
            os.close(fd)
    return Launched(qemu, qmp_ours, con_ours)
