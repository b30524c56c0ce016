"""The only module that talks to systemd's manager (PID 1), over D-Bus with pystemd.

Every call opens its own short-lived connection to the system bus.  Methods
are called on the bus directly (not through pystemd's introspecting Manager
and Unit objects): one round trip per call, no XML to parse.

Waiting for a job is race-free: the JobRemoved match and Subscribe() are in
place before the call that queues the job, so a job that finishes before the
call even returns is still seen (its signal waits in the connection's queue).
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from kvmagent.errors import ExitStatus, KvmagentError
from kvmagent.host import leanimport
from kvmagent.render.unitprops import SIGNATURES, Settings, props_for_dbus

# pystemd is imported after these calls, on purpose (E402): see kvmagent.host.leanimport.
leanimport.enter("pystemd")  # no lxml: kvmagent uses pystemd.dbuslib only
try:
    leanimport.import_without("pystemd.dbuslib", "pprint", "pformat")  # its error path only
    from pystemd.dbusexc import DBusBaseError  # noqa: E402
    from pystemd.dbuslib import DBus, DbusMessage, apply_signature, path_encode  # noqa: E402
except ImportError as e:  # a pystemd laid out otherwise than Debian 12's and 13's
    raise leanimport.missing("pystemd", e) from None

DEST = b"org.freedesktop.systemd1"
ROOT = b"/org/freedesktop/systemd1"
MANAGER = b"org.freedesktop.systemd1.Manager"
UNIT_PATH = b"/org/freedesktop/systemd1/unit"


# -- errors -------------------------------------------------------------------------------

def _error_name(exc: DBusBaseError) -> str:
    """pystemd keeps the D-Bus error name only for errors it has no class for."""
    if exc.err_name:
        return exc.err_name.decode() if isinstance(exc.err_name, bytes) else str(exc.err_name)
    stem = type(exc).__name__.removeprefix("DBus").removesuffix("Error")
    if stem == "NoSuchUnit":
        return "org.freedesktop.systemd1.NoSuchUnit"
    if stem in ("FileNotFound", "ConnectionRefused", "Interrupted"):
        return f"System.Error.{errno.errorcode.get(-exc.errno, exc.errno)}"
    return f"org.freedesktop.DBus.Error.{stem}"


def dbus_error(what: str, exc: DBusBaseError) -> KvmagentError:
    name = _error_name(exc)
    text = exc.err_message.decode(errors="replace") if isinstance(exc.err_message, bytes) \
        else str(exc.err_message)
    if name.endswith((".AccessDenied", ".InteractiveAuthorizationRequired")):
        return KvmagentError(f"{what}: {name}: {text}", "run kvmagent as root",
                             ExitStatus.NOPERMISSION)
    return KvmagentError(f"{what}: {name}: {text}")


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    try:
        yield
    except DBusBaseError as e:
        raise dbus_error(what, e) from None


def _text(value: Any) -> Any:
    """bytes -> str, recursively (pystemd returns D-Bus strings as bytes)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, list):
        return [_text(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_text(v) for v in value)
    if isinstance(value, dict):
        return {_text(k): _text(v) for k, v in value.items()}
    return value


# -- the connection -----------------------------------------------------------------------

class _Manager:
    """One system-bus connection to systemd; with watch_jobs, JobRemoved is recorded."""

    def __init__(self, watch_jobs: bool) -> None:
        self.bus = DBus()
        self.removed: dict[bytes, bytes] = {}  # job path -> result
        try:
            self.bus.open()
        except DBusBaseError as e:
            raise KvmagentError(
                f"cannot connect to the system bus: {_error_name(e)}",
                "kvmagent needs a host booted with systemd and dbus running "
                "(/run/dbus/system_bus_socket)", ExitStatus.HOST_NOT_READY) from None
        if watch_jobs:
            def on_job_removed(msg: DbusMessage, error: Any = None, userdata: Any = None) -> None:
                msg.process_reply(False)
                _id, job, _unit, result = msg.body
                self.removed[job] = result

            self._callback = on_job_removed  # sd-bus holds only a borrowed pointer
            try:
                self.bus.match_signal(DEST, ROOT, MANAGER, b"JobRemoved", on_job_removed)
                self.call("Subscribe", b"", [])  # no signals at all without a subscriber
            except DBusBaseError as e:
                self.close()
                raise dbus_error("cannot watch systemd's jobs", e) from None

    def close(self) -> None:
        self.bus.close()

    def call(self, method: str, sig: bytes, args: list[Any], *, path: bytes = ROOT,
             iface: bytes = MANAGER) -> Any:
        return self.call_raw(method, apply_signature(sig, args) if sig else [],
                             path=path, iface=iface)

    def call_raw(self, method: str, args: list[Any], *, path: bytes = ROOT,
                 iface: bytes = MANAGER) -> Any:
        return self.bus.call_method(DEST, path, iface, method.encode(), args).body

    def wait_job(self, job: bytes, unit: str, deadline: float) -> str:
        while job not in self.removed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise KvmagentError(f"timed out waiting for the job of {unit} "
                                    f"({job.decode()})",
                                    f"systemctl list-jobs; journalctl -u {unit}")
            with _errors(f"waiting for the job of {unit}"):
                self.bus.process()  # runs on_job_removed for a queued signal
                if job not in self.removed:
                    self.bus.wait(int(min(left, 1.0) * 1e6))  # returns at once if queued
        return self.removed.pop(job).decode()


@contextlib.contextmanager
def _manager(watch_jobs: bool = False) -> Iterator[_Manager]:
    m = _Manager(watch_jobs)
    try:
        yield m
    finally:
        m.close()


def unit_path(unit: str) -> bytes:
    return bytes(path_encode(UNIT_PATH, unit.encode()))


# -- the API ------------------------------------------------------------------------------

def _clear_leftover(m: _Manager, unit: str, deadline: float) -> None:
    """Stop and reset a unit of this name left by a crashed run (active or failed)."""
    try:
        path = m.call("GetUnit", b"s", [unit])
    except DBusBaseError:
        return  # not loaded: nothing left over
    with _errors(f"cannot clear the leftover {unit}"):
        state = m.bus.get_property(DEST, path, b"org.freedesktop.systemd1.Unit",
                                   b"ActiveState", b"s")
        if state not in (b"inactive", b"failed"):
            m.wait_job(m.call("StopUnit", b"ss", [unit, b"replace"]), unit, deadline)
    with contextlib.suppress(DBusBaseError):  # NoSuchUnit: already collected
        m.call("ResetFailedUnit", b"s", [unit])


def property_array(props: dict[bytes, Any]) -> list[Any]:
    """props_for_dbus()'s properties marshalled as a(sv) for pystemd.dbuslib.
    (pystemd's own signature_array knows fewer properties: its table lacks
    PIDs, CPUWeight, AllowedCPUs, DeviceAllow, Restart and more in 0.11.)"""
    args: list[Any] = [(ord("a"), b"(sv)")]
    for name, value in props.items():
        sig = SIGNATURES[name.decode()]
        args += [(ord("r"), b"sv"), (ord("s"), name), (ord("v"), sig),
                 *apply_signature(sig, [value]), (-1, None), (-1, None)]
    return args + [(-1, None)]


def _transient_args(unit: str, settings: Settings) -> list[Any]:
    """StartTransientUnit's arguments: name, mode "fail", the properties
    (bad ones raise here, before any call), no auxiliary units."""
    return (apply_signature(b"ss", [unit.encode(), b"fail"])
            + property_array(props_for_dbus(settings))
            + [(ord("a"), b"(sa(sv))"), (-1, None)])


def start_scope(unit: str, pid: int, settings: Settings, *, timeout: float = 10.0) -> None:
    """Move pid into a new transient scope unit with settings; wait for its start job.
    timeout bounds the job waits; a single D-Bus call has sd-bus's own 25 s limit."""
    args = _transient_args(unit, [*settings, ("PIDs", [pid])])
    deadline = time.monotonic() + timeout
    with _manager(watch_jobs=True) as m:
        # PID 1 garbage-collects a reset unit before it reads our next message,
        # so StartTransientUnit does not see it (no UnitExists; checked on 252).
        _clear_leftover(m, unit, deadline)
        with _errors(f"cannot start {unit}"):
            job = m.call_raw("StartTransientUnit", args)
        result = m.wait_job(job, unit, deadline)
    if result != "done":
        raise KvmagentError(f"cannot start {unit}: its start job ended with result {result!r}",
                            f"journalctl -u {unit}")


def _unit_job(method: str, unit: str, wait: bool, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    with _manager(watch_jobs=wait) as m, _errors(f"cannot {method.removesuffix('Unit').lower()} "
                                                 f"{unit}"):
        job = m.call(method, b"ss", [unit, b"replace"])
        return m.wait_job(job, unit, deadline) if wait else None


def start_unit(unit: str, *, wait: bool = True, timeout: float = 90.0) -> str | None:
    """Queue a start job; with wait, its result: done, failed, timeout, dependency, ..."""
    return _unit_job("StartUnit", unit, wait, timeout)


def stop_unit(unit: str, *, wait: bool = True, timeout: float = 90.0) -> str | None:
    return _unit_job("StopUnit", unit, wait, timeout)


def restart_unit(unit: str, *, wait: bool = True, timeout: float = 90.0) -> str | None:
    return _unit_job("RestartUnit", unit, wait, timeout)


def kill_unit(unit: str, whom: str, signum: int) -> None:
    """Send SIGNUM to the unit's main process ("main") or all ("all")."""
    with _manager() as m, _errors(f"cannot signal {unit}"):
        m.call("KillUnit", b"ssi", [unit, whom, signum])


def unit_properties(unit: str, names: Sequence[str]) -> dict[str, Any]:
    """Properties of any interface of unit (loading it if needed), strings decoded."""
    with _manager() as m, _errors(f"cannot read the properties of {unit}"):
        body = m.call("GetAll", b"s", [b""], path=unit_path(unit),
                      iface=b"org.freedesktop.DBus.Properties")
    props = body if isinstance(body, dict) else {}
    missing = [n for n in names if n.encode() not in props]
    if missing:
        raise KvmagentError(f"{unit} has no property {', '.join(missing)}")
    return {n: _text(props[n.encode()]) for n in names}


def list_units(patterns: Sequence[str]) -> list[dict[str, str]]:
    """Loaded units matching the glob patterns, in one ListUnitsByPatterns call."""
    with _manager() as m, _errors("cannot list units"):
        rows = m.call("ListUnitsByPatterns", b"asas", [[], [p.encode() for p in patterns]])
    return [{"name": r[0], "description": r[1], "load_state": r[2], "active_state": r[3],
             "sub_state": r[4]} for r in _text(rows or [])]


class Scope(NamedTuple):
    """What systemd knows of a running scope (QEMU's kvm-NAME.scope)."""
    active_state: str
    since: float | None  # ActiveEnterTimestamp, CLOCK_REALTIME seconds
    processes: list[tuple[int, str]]  # pid, command line


def scopes(units: Sequence[str]) -> dict[str, Scope]:
    """The scopes among UNITS that systemd has loaded, each with its
    processes (GetUnitProcesses) and since when it is active; over one
    connection.  For when kvmagent's own record says nothing of a running
    guest: systemd's view of its QEMU."""
    out = {}
    with _manager() as m:
        for unit in units:
            try:
                path = m.call("GetUnit", b"s", [unit])
            except DBusBaseError as e:
                if _error_name(e).endswith(".NoSuchUnit"):
                    continue
                raise dbus_error(f"cannot look up {unit}", e) from None
            with _errors(f"cannot read the state of {unit}"):
                props = m.call("GetAll", b"s", [b"org.freedesktop.systemd1.Unit"], path=path,
                               iface=b"org.freedesktop.DBus.Properties")
                procs = m.call("GetUnitProcesses", b"s", [unit])
            props = props if isinstance(props, dict) else {}
            usec = props.get(b"ActiveEnterTimestamp") or 0
            out[unit] = Scope(_text(props.get(b"ActiveState", b"")),
                              usec / 1e6 if usec else None,
                              [(int(pid), str(cmdline)) for _, pid, cmdline in _text(procs or [])])
    return out


def template_installed(name: str = "kvm@.service") -> bool:
    """Whether systemd finds a unit file for name (GetUnitFileState)."""
    with _manager() as m:
        try:
            m.call("GetUnitFileState", b"s", [name.encode()])
        except DBusBaseError as e:
            if e.errno == -errno.ENOENT:
                return False
            raise dbus_error(f"cannot look up {name}", e) from None
    return True


# ActiveStates of a unit that has (or is about to have, or is ending) processes.
RUNNING_STATES = ("active", "activating", "deactivating", "reloading")


def job_pending(unit: str) -> bool:
    """A job is queued for UNIT: a start that waits for the units it comes
    after leaves it inactive meanwhile (the first guest after boot waits
    for machine.slice, network-online.target, the modules)."""
    try:
        job = unit_properties(unit, ["Job"])["Job"]
    except KvmagentError:
        return False
    return isinstance(job, tuple) and len(job) == 2 and job[0] != 0


def active_state(unit: str) -> str | None:
    """The unit's ActiveState, or None when systemd has not loaded it (a
    transient unit that was collected, or a template instance never used)."""
    with _manager() as m:
        return _active_state(m, unit)


def _active_state(m: _Manager, unit: str) -> str | None:
    try:
        path = m.call("GetUnit", b"s", [unit])
    except DBusBaseError as e:
        if _error_name(e).endswith(".NoSuchUnit"):
            return None
        raise dbus_error(f"cannot look up {unit}", e) from None
    with _errors(f"cannot read the state of {unit}"):
        return _text(m.bus.get_property(DEST, path, b"org.freedesktop.systemd1.Unit",
                                        b"ActiveState", b"s"))


def start_service(unit: str, settings: Settings, *, timeout: float = 90.0,
                  wait: bool = True) -> str | None:
    """Start unit as a transient service with settings; wait for the job.

    A unit of that name that is running (or restarting) keeps running: only a
    start job is queued, as `systemctl start` would.  One left failed is reset
    first, so it is made again with these settings."""
    args = _transient_args(unit, settings)
    deadline = time.monotonic() + timeout
    with _manager(watch_jobs=wait) as m:
        state = _active_state(m, unit)
        if state in RUNNING_STATES:
            with _errors(f"cannot start {unit}"):
                job = m.call("StartUnit", b"ss", [unit, b"replace"])
        else:
            if state is not None:
                with contextlib.suppress(DBusBaseError):  # collected meanwhile
                    m.call("ResetFailedUnit", b"s", [unit])
            try:
                job = m.call_raw("StartTransientUnit", args)
            except DBusBaseError as e:
                if _error_name(e).endswith(".UnitExists"):
                    raise KvmagentError(
                        f"cannot start {unit} as a transient unit: systemd has a unit file "
                        f"or a loaded unit of that name",
                        f"systemctl status {unit}; a template such as kvm@.service "
                        "makes its instances unit files") from None
                raise dbus_error(f"cannot start {unit}", e) from None
        return m.wait_job(job, unit, deadline) if wait else None
