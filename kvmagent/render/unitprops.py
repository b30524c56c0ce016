"""Unit settings as systemd's D-Bus properties: pure data, no bus.

scope_settings()/service_settings() give (unit-file key, value) pairs;
props_for_dbus() turns them into the properties of StartTransientUnit, each
with the D-Bus type systemd's manager expects (SIGNATURES), checked here so
that a bad value is refused before any call.  kvmagent.host.systemd marshals and
sends them."""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import Any

from kvmagent.config.values import parse_cpu_list
from kvmagent.errors import KvmagentError

UINT64_MAX = (1 << 64) - 1  # "infinity"
MS_REC = 16384  # <sys/mount.h>: BindReadOnlyPaths= binds recursively, as a unit file's
_INFINITY_OK = {"MemoryMax", "MemoryHigh", "TasksMax"}  # (for CPUWeight it means "unset")

# D-Bus type of every property kvmagent puts on a transient unit (systemd 252,
# src/core/dbus-cgroup.c, dbus-unit.c, dbus-scope.c, dbus-service.c,
# dbus-execute.c, dbus-kill.c).  A unit-file key FooSec is the D-Bus
# property FooUSec (microseconds); props_for_dbus converts.
SIGNATURES: dict[str, bytes] = {
    "Description": b"s", "Slice": b"s", "CollectMode": b"s", "DevicePolicy": b"s",
    "BindsTo": b"as", "PartOf": b"as", "Before": b"as", "After": b"as", "Wants": b"as",
    "OnFailure": b"as", "FileDescriptorStoreMax": b"u", "RuntimeDirectoryPreserve": b"s",
    "Conflicts": b"as", "Documentation": b"as", "RequiresMountsFor": b"as",
    "MemoryMax": b"t", "MemoryHigh": b"t", "CPUWeight": b"t", "IOWeight": b"t",
    "TasksMax": b"t",
    "AllowedCPUs": b"ay",  # a CPU bitmask, bit N of byte N//8 = CPU N
    "DeviceAllow": b"a(ss)",  # (device path or class, "rwm")
    "PIDs": b"au",
    # services (kvm@NAME.service made transient; kvmagent.render.service)
    "Type": b"s", "NotifyAccess": b"s", "KillMode": b"s", "Restart": b"s",
    # ExecStart=/ExecStopPost= are sent as these, with the prefixes of a unit
    # file's command line as flags
    "ExecStartEx": b"a(sasas)", "ExecStopPostEx": b"a(sasas)",
    "ExecReloadEx": b"a(sasas)",  # (path, argv, flags)
    "RestartUSec": b"t", "TimeoutStartUSec": b"t", "TimeoutStopUSec": b"t",
    "WatchdogUSec": b"t", "StartLimitIntervalUSec": b"t", "StartLimitBurst": b"u",
    "RestartPreventExitStatus": b"(aiai)",  # (exit statuses, signals)
    "RuntimeDirectory": b"as", "RuntimeDirectoryMode": b"u", "StateDirectory": b"as",
    "Environment": b"as",
    # the sandbox (kvmagent.render.service.SANDBOX)
    "CapabilityBoundingSet": b"t", "RestrictNamespaces": b"t", "UMask": b"u",
    "NoNewPrivileges": b"b", "ProtectHome": b"s", "ProtectSystem": b"s",
    "PrivateTmp": b"b", "PrivateMounts": b"b", "ProtectKernelTunables": b"b",
    "ProtectKernelModules": b"b", "ProtectKernelLogs": b"b", "ProtectControlGroups": b"b",
    "ProtectClock": b"b", "ProtectHostname": b"b", "LockPersonality": b"b",
    "RestrictRealtime": b"b", "RestrictSUIDSGID": b"b", "MemoryDenyWriteExecute": b"b",
    "RestrictAddressFamilies": b"(bas)", "SystemCallFilter": b"(bas)",  # (allow list, items)
    "SystemCallArchitectures": b"as", "SystemCallErrorNumber": b"i", "ReadWritePaths": b"as",
    "BindReadOnlyPaths": b"a(ssbt)",  # (source, destination, ignore if missing, mount flags)
}
# <linux/capability.h>: the capabilities kvmagent names (CapabilityBoundingSet=).
CAPABILITIES = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_KILL": 5, "CAP_SETGID": 6,
                "CAP_SETUID": 7, "CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21,
                "CAP_SYS_NICE": 23}
Settings = Iterable[tuple[str, Any]]


def cpu_mask(value: object) -> bytes:
    """"0-2,5" (or [0, 1, 2, 5]) -> the little-endian CPU bitmask systemd wants."""
    cpus = parse_cpu_list(list(value) if isinstance(value, tuple) else value)
    mask = bytearray(cpus[-1] // 8 + 1)
    for cpu in cpus:
        mask[cpu // 8] |= 1 << (cpu % 8)
    return bytes(mask)


# systemd.service(5), "Command lines": the prefixes kvmagent uses, and
# their names in ExecStartEx= and friends
EXEC_PREFIXES = {"-": "ignore-failure", "+": "privileged", ":": "no-env-expand"}


def _convert(name: str, sig: bytes, value: Any) -> Any:
    if sig == b"b" and isinstance(value, bool):
        return value
    if sig == b"s" and isinstance(value, bool):  # ProtectHome=yes
        return b"yes" if value else b"no"
    if name == "CapabilityBoundingSet" and isinstance(value, list):
        return sum(1 << CAPABILITIES[cap] for cap in value)
    if name == "RestrictNamespaces" and value is True:
        return 0  # the D-Bus value is the set of namespaces *allowed*: none
    if sig == b"(bas)" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return (True, [v.encode() for v in value])  # an allow list
    if sig == b"i" and isinstance(value, str) and hasattr(errno, value):
        return getattr(errno, value)
    if sig == b"s" and isinstance(value, str):
        return value.encode()
    if sig == b"as":
        items = [value] if isinstance(value, str) else list(value)
        if all(isinstance(v, str) for v in items):
            return [v.encode() for v in items]
    if sig == b"t":
        if value == "infinity" and name in _INFINITY_OK:
            return UINT64_MAX
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= UINT64_MAX:
            return value
    if sig == b"au" and all(isinstance(v, int) and v > 0 for v in value):
        return list(value)
    if sig == b"ay":
        return cpu_mask(value)
    if sig == b"a(ss)":
        pairs = [tuple(v.split(None, 1)) if isinstance(v, str) else tuple(v) for v in value]
        if all(len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
            return [(p.encode(), perm.encode()) for p, perm in pairs]
    if sig == b"a(ssbt)" and all(isinstance(v, tuple) and len(v) == 2 and
                                 all(isinstance(p, str) and p.startswith("/") for p in v)
                                 for v in value):
        return [(src.encode(), dst.encode(), False, MS_REC) for src, dst in value]
    if sig == b"u" and _is_int(value) and 0 <= value < 1 << 32:
        return value
    if sig == b"(aiai)" and value and all(_is_int(v) and 0 <= v <= 255 for v in value):
        return (list(value), [])
    if sig == b"a(sasas)" and value and all(isinstance(v, str) and v for v in value):
        # argv as in a unit file: "-/usr/bin/x" ignores x's failure, "+" runs
        # it with full privileges (outside the sandbox)
        program = value[0].lstrip("".join(EXEC_PREFIXES))
        prefixes = value[0][:len(value[0]) - len(program)]
        if program.startswith("/") and len(set(prefixes)) == len(prefixes):
            return [(program.encode(), [program.encode(), *(v.encode() for v in value[1:])],
                     [EXEC_PREFIXES[p].encode() for p in prefixes])]
    raise ValueError(f"not a valid value for D-Bus type {sig.decode()}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _usec(name: str, value: Any) -> tuple[str, Any]:
    """FooSec = seconds (a unit-file key) -> FooUSec = microseconds (D-Bus)."""
    if not (name.endswith("Sec") and f"{name[:-3]}USec" in SIGNATURES):
        return name, value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        value = round(value * 1_000_000)
    return f"{name[:-3]}USec", value  # anything else fails in _convert


def props_for_dbus(settings: Settings) -> dict[bytes, Any]:
    """scope_settings()/service_settings() pairs -> StartTransientUnit properties
    for pystemd.  A list-valued key given twice adds up, as in a unit file."""
    props: dict[bytes, Any] = {}
    for key, value in settings:
        name, converted = _usec(key, value)
        if f"{name}Ex" in SIGNATURES:
            name += "Ex"  # with the prefixes as flags
        sig = SIGNATURES.get(name)
        if sig is None:
            raise KvmagentError(f"unit setting {key}= has no known D-Bus type",
                                hint="add it to kvmagent.render.unitprops.SIGNATURES")
        try:
            converted = _convert(name, sig, converted)
        except (ValueError, TypeError) as e:
            raise KvmagentError(f"bad unit setting {key}={value!r}: {e}") from None
        if sig.startswith(b"a") and name.encode() in props:
            props[name.encode()] = props[name.encode()] + converted
        else:
            props[name.encode()] = converted
    return props
