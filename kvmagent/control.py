"""`kvmagent start|stop|restart NAME`: drive kvm@NAME.service over D-Bus
(pystemd) and report the outcome, as `systemctl` would but with the
guest's configuration checked first, so a bad file is reported here, by
file, key and value, instead of as a failed unit."""

from __future__ import annotations

import argparse
from typing import Any

from .errors import ExitStatus, KvmagentError
from .guests import load_guest, load_host_config
from .names import service_unit
from .paths import Paths

RESULT_HINT = "see: systemctl status {unit}; journalctl -u {unit}"


def _job(action: str, args: argparse.Namespace, paths: Paths) -> int:
    from . import systemd  # pystemd: only for these commands
    host = load_host_config(paths)
    guest = load_guest(paths, args.name, host)  # exit 6/8 before touching systemd
    unit = service_unit(guest.name)
    if action != "stop" and not systemd.template_installed():
        raise KvmagentError("kvm@.service is not installed on this host",
                            "install the kvmagent package, or copy units/kvm@.service "
                            "to /etc/systemd/system/ and run systemctl daemon-reload",
                            ExitStatus.HOST_NOT_READY)
    timeout = {"start": host.device_timeout + 60,
               "stop": guest.stop_timeout + 60}.get(action, host.device_timeout +
                                                     guest.stop_timeout + 120)
    if action == "stop" and args.force:
        # SIGUSR1 first: the supervisor stops QEMU at once, no ACPI (the
        # power cord); the stop job then only waits for it to exit.
        import signal
        if systemd.unit_properties(unit, ["ActiveState"])["ActiveState"] == "active":
            systemd.kill_unit(unit, "main", signal.SIGUSR1)
    job: dict[str, Any] = {"start": systemd.start_unit, "stop": systemd.stop_unit,
                           "restart": systemd.restart_unit}
    result = job[action](unit, wait=not args.no_block, timeout=timeout)
    if args.no_block:
        print(f"{unit}: {action} queued")
        return ExitStatus.OK
    if result != "done":
        raise KvmagentError(f"{unit}: {action} {result}", RESULT_HINT.format(unit=unit))
    done = {"start": "started", "stop": "stopped", "restart": "restarted"}[action]
    print(f"{unit}: {done}")
    return ExitStatus.OK


def cmd_start(args: argparse.Namespace, paths: Paths) -> int:
    return _job("start", args, paths)


def cmd_stop(args: argparse.Namespace, paths: Paths) -> int:
    return _job("stop", args, paths)


def cmd_restart(args: argparse.Namespace, paths: Paths) -> int:
    return _job("restart", args, paths)
