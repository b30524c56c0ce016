"""The only module that talks to systemd-machined (org.freedesktop.machine1), with pydbus.

kvmagent does not let machined create the guest's unit (CreateMachine would
make its own machine-NAME.scope); QEMU is put in kvm-NAME.scope first
(kvmagent.host.systemd.start_scope) and then registered.  RegisterMachine needs the
leader to be in a unit already: a PID in no unit gives
System.Error.ENXIO "Failed to determine unit of process N".

machined drops the machine by itself when its unit (the scope) goes away;
unregister() is for a supervisor that ends its guest but keeps running.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from typing import Any

from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.host import leanimport


class GiFutureStateError(Exception):
    """asyncio.InvalidStateError as gi sees it here: raised only by gi's
    own futures of Gio's async calls, which kvmagent never makes."""


# gi is imported after this call, on purpose (E402): Debian 13's gi imports
# asyncio as it loads (~95 ms) for what pydbus's blocking calls never use;
# it takes these two names from it (see kvmagent.host.leanimport).
leanimport.import_without("gi.repository.GLib", "asyncio", "_get_running_loop",
                          InvalidStateError=GiFutureStateError)
from gi.repository import GLib  # noqa: E402
from pydbus import SystemBus  # noqa: E402

BUS_NAME = "org.freedesktop.machine1"
_REMOTE = re.compile(r"^GDBus\.Error:([\w.]+): (.*)$", re.DOTALL)


def _split(exc: GLib.Error) -> tuple[str, str]:
    """(D-Bus error name, message) of a GLib.Error raised by a pydbus call."""
    m = _REMOTE.match(exc.message or "")
    return (m.group(1), m.group(2)) if m else (exc.domain, exc.message or str(exc))


def _error(what: str, exc: GLib.Error) -> KvmagentError:
    name, text = _split(exc)
    if name.endswith((".AccessDenied", ".InteractiveAuthorizationRequired")):
        return KvmagentError(f"{what}: {name}: {text}", "run kvmagent as root",
                             ExitStatus.NOPERMISSION)
    return KvmagentError(f"{what}: {name}: {text}")


def _manager() -> Any:
    try:
        bus = SystemBus()
    except GLib.Error as e:
        raise KvmagentError(
            f"cannot connect to the system bus: {e.message}",
            "kvmagent needs a host booted with systemd and dbus running "
            "(/run/dbus/system_bus_socket)", ExitStatus.HOST_NOT_READY) from None
    try:
        return bus.get(BUS_NAME)  # bus-activated: starts systemd-machined if needed
    except GLib.Error as e:
        raise KvmagentError(f"cannot reach systemd-machined: {_split(e)[1]}",
                            "install systemd-container", ExitStatus.HOST_NOT_READY) from None


def register(name: str, uuid: str, leader: int, ifindices: list[int], *,
             service: str = "kvmagent", cls: str = "vm") -> None:
    """Register the running guest: `machinectl list` shows it, with its unit and taps."""
    machine_id = list(uuidlib.UUID(uuid).bytes)
    manager = _manager()
    try:
        manager.RegisterMachineWithNetwork(name, machine_id, service, cls, leader, "",
                                           list(ifindices))
    except GLib.Error as e:
        raise _error(f"cannot register machine {name} (leader {leader})", e) from None


def unregister(name: str) -> None:
    """Forget the machine without touching its processes (UnregisterMachine, which
    systemd 252 has; TerminateMachine would SIGTERM the leader).  Unknown: no-op."""
    manager = _manager()
    try:
        manager.UnregisterMachine(name)
    except GLib.Error as e:
        if _split(e)[0] != "org.freedesktop.machine1.NoSuchMachine":
            raise _error(f"cannot unregister machine {name}", e) from None


def machines() -> list[tuple[str, str, str]]:
    """(name, class, service) of every machine machined knows, the host (.host) too."""
    manager = _manager()
    try:
        return [(n, c, s) for n, c, s, _path in manager.ListMachines()]
    except GLib.Error as e:
        raise _error("cannot list machines", e) from None
