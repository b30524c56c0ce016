"""`kvmagent stop --force NAME`: pull the power cord, fast.

The supervisor writes its pid to RUNTIME_DIR/NAME/supervisor.pid
(Paths.supervisor_pid: in the unit's RuntimeDirectory=, removed with the
unit).  The command checks that the pid still is kvm@NAME.service's
process (its cgroup), holds it as a pidfd so that the pid cannot be reused
under it, sends SIGUSR1 — the supervisor kills QEMU at once and exits
successfully, so systemd does not restart the guest — and waits until the
supervisor is gone.  No D-Bus, no configuration: a hard stop is the tool
for a guest that is in trouble, and it costs a few milliseconds.  Without
the pid file (a supervisor not under systemd, or one of an older version)
it is the same SIGUSR1 through systemd (KillUnit), then the stop job."""

from __future__ import annotations

import os
import select
import signal
from typing import TYPE_CHECKING

from kvmagent.errors import ExitStatus, KvmagentError

if TYPE_CHECKING:
    import argparse

    from kvmagent.paths import Paths

EXIT_WAIT = 30.0  # seconds for the supervisor to reap QEMU and exit


def _pidfd(pid: int, cgroups: tuple[str, ...]) -> int | None:
    """A pidfd of PID if, once held, it is in one of CGROUPS (its unit)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            if any(line.rstrip("\n").endswith(cgroups) for line in f):
                return pidfd
    except OSError:
        pass
    os.close(pidfd)
    return None


def _supervisor_pidfd(paths: Paths, name: str) -> int | None:
    """A pidfd of guest NAME's supervisor under systemd, or None.  (The pid
    file's second pid, QEMU's, is for admins: the command waits for the
    supervisor, which exits once QEMU has.)"""
    from kvmagent.names import oneoff_unit, service_unit
    try:
        pids = [int(p) for p in paths.supervisor_pid(name).read_text().split()]
    except (OSError, ValueError):
        return None
    if not pids:
        return None
    return _pidfd(pids[0], (f"/{service_unit(name)}", f"/{oneoff_unit(name)}"))


def force_stop(paths: Paths, name: str) -> bool:
    """SIGUSR1 to the supervisor (it kills QEMU, records the stop and exits
    successfully, so the guest is not restarted), then wait until it is
    gone: until then the unit is still active, and a `start` right after
    would find the guest running and do nothing.  False if there is no
    supervisor to signal."""
    supervisor = _supervisor_pidfd(paths, name)
    if supervisor is None:
        return False
    try:
        try:
            signal.pidfd_send_signal(supervisor, signal.SIGUSR1)
        except ProcessLookupError:
            return True  # gone already
        poller = select.poll()
        poller.register(supervisor, select.POLLIN)  # readable once it exited
        return bool(poller.poll(EXIT_WAIT * 1000))  # stuck: systemd's stop job deals with it
    finally:
        os.close(supervisor)


def cmd_stop(args: argparse.Namespace, paths: Paths) -> int:
    from kvmagent.names import GUEST_NAME_RULE, service_unit, valid_guest_name
    if not valid_guest_name(args.name):
        raise KvmagentError(f"invalid guest name {args.name!r}", GUEST_NAME_RULE,
                            ExitStatus.UNKNOWN_GUEST)  # as load_guest() says it
    if args.force and not args.no_block and force_stop(paths, args.name):
        print(f"{service_unit(args.name)}: stopped (QEMU killed)")
        return ExitStatus.OK
    from kvmagent.cli.control import cmd_stop as stop_via_systemd
    return stop_via_systemd(args, paths)
