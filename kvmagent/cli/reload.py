"""kvmagent reload [NAME...]: running supervisors move to the installed
kvmagent code, their guests untouched (kvmagent.unit.channel's "reload":
the supervisor re-executes itself and takes its guest over).  The
package's maintainer scripts run it after an upgrade; `systemctl reload
kvm@NAME` runs it for one guest."""

from __future__ import annotations

import argparse
import sys
import time

from kvmagent import __version__
from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.names import valid_guest_name
from kvmagent.paths import Paths
from kvmagent.unit import protocol

RELOAD_TIMEOUT = 30.0


def running_guests(paths: Paths) -> list[str]:
    """The guests whose supervisor serves a control channel."""
    if not paths.runtime_dir.is_dir():
        return []
    return sorted(d.name for d in paths.runtime_dir.iterdir()
                  if valid_guest_name(d.name) and paths.control_socket(d.name).is_socket())


def reload_one(paths: Paths, name: str, timeout: float = RELOAD_TIMEOUT) -> protocol.Status:
    """Reload guest NAME's supervisor and wait until the new code answers."""
    path = paths.control_socket(name)
    before = protocol.call(path, protocol.StatusAsk(), protocol.Status)
    protocol.call(path, protocol.ReloadAsk(), protocol.Done)
    deadline = time.monotonic() + timeout
    while True:
        try:
            now = protocol.call(path, protocol.StatusAsk(), protocol.Status, timeout=2.0)
            if now.supervising_since != before.supervising_since:
                if now.qemu_pid != before.qemu_pid:
                    raise KvmagentError(f"guest {name}: QEMU pid {before.qemu_pid} is now "
                                        f"{now.qemu_pid} after the reload", None,
                                        ExitStatus.FAILURE)
                return now
        except KvmagentError:
            pass  # the new code is still starting
        if time.monotonic() > deadline:
            raise KvmagentError(f"guest {name}: the reloaded supervisor did not answer within "
                                f"{timeout:g} s", f"see journalctl -u kvm@{name}",
                                ExitStatus.FAILURE)
        time.sleep(0.05)


def cmd_reload(args: argparse.Namespace, paths: Paths) -> int:
    names = args.names or running_guests(paths)
    status = ExitStatus.OK
    for name in names:
        if not valid_guest_name(name):
            print(f"kvmagent: invalid guest name {name!r}", file=sys.stderr)
            status = ExitStatus.UNKNOWN_GUEST
            continue
        try:
            now = reload_one(paths, name)
        except KvmagentError as e:
            print(f"kvmagent: {e}", file=sys.stderr)
            status = ExitStatus.FAILURE
            continue
        print(f"{name}: supervisor {now.supervisor_pid} runs kvmagent {now.version}, "
              f"QEMU pid {now.qemu_pid} untouched")
    if not names and not args.quiet:
        print(f"kvmagent: no running guest to reload (kvmagent {__version__})", file=sys.stderr)
    return status
