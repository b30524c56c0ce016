"""`kvmagent stop --force NAME`: pull the power cord, fast.

The supervisor writes its pid to RUNTIME_DIR/NAME/supervisor.pid (the
unit's RuntimeDirectory=, removed with the unit).  The command checks that
the pid still is kvm@NAME.service's process (its cgroup), holds it as a
pidfd so that the pid cannot be reused under it, sends SIGUSR1 — the
supervisor kills QEMU at once and exits successfully, so systemd does not
restart the guest — and waits until the supervisor is gone.  No D-Bus, no
configuration: a hard stop is the tool for a guest that is in trouble, and
it costs a few milliseconds.  Without the pid file (a supervisor not under
systemd, or one of an older version) it is the same SIGUSR1 through
systemd (KillUnit), then the stop job."""

from __future__ import annotations

import os
import select
import signal
from contextlib import suppress
from typing import TYPE_CHECKING

from .errors import ExitStatus, KvmagentError

if TYPE_CHECKING:  # the supervisor imports this module: only what it needs
    import argparse

    from .paths import Paths

PID_FILE = "supervisor.pid"
EXIT_WAIT = 30.0  # seconds for the supervisor to reap QEMU and exit


def write_pid_file(paths: Paths, name: str) -> None:
    """Called by the supervisor at start (replaces the file atomically)."""
    directory = paths.guest_runtime(name)
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    tmp = directory / f".{PID_FILE}.tmp"
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, directory / PID_FILE)


def remove_pid_file(paths: Paths, name: str) -> None:
    with suppress(FileNotFoundError):
        (paths.guest_runtime(name) / PID_FILE).unlink()


def _supervisor_pidfd(paths: Paths, name: str) -> int | None:
    """A pidfd of guest NAME's supervisor under systemd, or None."""
    from .names import service_unit
    from .service import oneoff_unit
    try:
        pid = int((paths.guest_runtime(name) / PID_FILE).read_text())
        pidfd = os.pidfd_open(pid)
    except (OSError, ValueError):
        return None
    try:  # the pid is held now: is it still the supervisor of this guest?
        with open(f"/proc/{pid}/cgroup") as f:
            units = (f"/{service_unit(name)}", f"/{oneoff_unit(name)}")
            ours = any(line.rstrip("\n").endswith(units) for line in f)
    except OSError:
        ours = False
    if not ours:
        os.close(pidfd)
        return None
    return pidfd


def force_stop(paths: Paths, name: str) -> bool:
    """SIGUSR1 to the supervisor and wait for it; False if there is none."""
    pidfd = _supervisor_pidfd(paths, name)
    if pidfd is None:
        return False
    try:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGUSR1)
        except ProcessLookupError:
            return True  # gone already
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)  # readable once the process exited
        if not poller.poll(EXIT_WAIT * 1000):
            return False  # stuck: let systemd's stop job deal with it
        return True
    finally:
        os.close(pidfd)


def cmd_stop(args: argparse.Namespace, paths: Paths) -> int:
    from .names import GUEST_NAME_RULE, service_unit, valid_guest_name
    if not valid_guest_name(args.name):
        raise KvmagentError(f"invalid guest name {args.name!r}", GUEST_NAME_RULE,
                            ExitStatus.UNKNOWN_GUEST)  # as load_guest() says it
    if args.force and not args.no_block and force_stop(paths, args.name):
        print(f"{service_unit(args.name)}: stopped (QEMU killed)")
        return ExitStatus.OK
    from .control import cmd_stop as stop_via_systemd
    return stop_via_systemd(args, paths)
